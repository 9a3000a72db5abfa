"""The alert and recording rules: promtool's checks and unit tests, every alert tested firing, contract names only."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.helpers import DEPLOY, exported_series_names, metrics_names_in_contract, tool

PROM = DEPLOY / "prometheus"
RULES = sorted((PROM / "rules").glob("*.yml"))
TESTS = sorted((PROM / "tests").glob("*.yml"))
# The list of situations an operator must be woken for, each with the alert that covers it.
REQUIRED_ALERTS = {
    "quarantine rate far above usual": "FilmgateQuarantineRateHigh",
    "a reason suddenly dominating": "FilmgateQuarantineReasonDominant",
    "deliveries failing": "FilmgateDeliveriesFailing",
    "dead letters appearing": "FilmgateDeadLetters",
    "backlog growing": "FilmgateBacklogGrowing",
    "node down": "FilmgateDown",
}


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=PROM)


def _rules() -> list[dict]:
    return [r for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]]


def test_rule_files_pass_promtool_check():
    assert RULES, "no rule files under deploy/prometheus/rules"
    res = _promtool("check", "rules", *map(str, RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_rule_unit_tests_pass():
    assert TESTS, "no promtool unit tests under deploy/prometheus/tests"
    res = _promtool("test", "rules", *map(str, TESTS))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_prometheus_config_passes_promtool_check():
    res = _promtool("check", "config", "--syntax-only", str(PROM / "prometheus.yml"))
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_unit_tested_firing():
    """Each alert has at least one promtool case where it fires (and the issue's situations are all covered)."""
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert set(REQUIRED_ALERTS.values()) <= alerts
    fired = set()
    for f in TESTS:
        for case in yaml.safe_load(f.read_text())["tests"]:
            for t in case.get("alert_rule_test", []):
                if t.get("exp_alerts"):
                    fired.add(t["alertname"])
    assert alerts - fired == set(), f"alerts without a firing unit test: {sorted(alerts - fired)}"


def test_alerts_are_documented_and_routed():
    for r in _rules():
        if "alert" in r:
            assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
            assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]


def test_rules_use_only_contract_metric_names():
    """A typo in a metric name makes an alert silently never fire: every filmgate_* name must be in the contract."""
    allowed = exported_series_names(metrics_names_in_contract())
    used = set()
    for r in _rules():
        used |= set(re.findall(r"(?<![:\w])filmgate_[a-z_]+(?![:\w])", r["expr"]))
    assert used, "no filmgate metric used by the rules"
    assert used - allowed == set(), f"not in docs/ARCHITECTURE.md: {sorted(used - allowed)}"
