"""Writes the filmgate Grafana dashboard (deploy/grafana/dashboards/filmgate.json) from the panel list below.

Why generated: thirty hand-edited PromQL strings inside a large JSON file drift and break silently. Here each panel is
one line of intent; tests/ops checks that the committed JSON equals this script's output, that every query uses only
the metric names of docs/ARCHITECTURE.md, and (tests/ops/test_orthanc_pipeline.py) that every query runs on a real
Prometheus scraping a real node. Run ``python deploy/grafana/build_dashboard.py`` after editing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "filmgate.json"
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Selectors shared by every query: the scrape job, and the dashboard's variables.
NODE = 'job="filmgate", instance=~"$instance"'
SENDER = f'{NODE}, calling_ae=~"$calling_ae"'
W = "$__rate_interval"


def _target(expr: str, legend: str = "", ref: str = "A", instant: bool = False, fmt: str = "time_series") -> dict:
    t = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto", "refId": ref, "format": fmt}
    if instant:
        t["instant"] = True
        t["range"] = False
    return t


def _quantiles(metric: str, by: str = "", where: str = NODE) -> list[dict]:
    """p50, p95 and p99 from a histogram's buckets, optionally split by a label."""
    group = f"le, {by}" if by else "le"
    out = []
    for ref, q in zip("ABC", ("0.5", "0.95", "0.99"), strict=True):
        legend = f"p{round(float(q) * 100)}" + (f" {{{{{by}}}}}" if by else "")
        expr = f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{where}}}[{W}])))"
        out.append(_target(expr, legend, ref))
    return out


def _ratio(num: str, den: str, by: str = "") -> str:
    if by:
        return f"sum by ({by}) ({num}) / sum by ({by}) ({den})"
    return f"sum({num}) / sum({den})"


def _q_rate(window: str = W, by: str = "") -> str:
    return _ratio(
        f'rate(filmgate_decisions_total{{{SENDER}, outcome="quarantine"}}[{window}])',
        f"rate(filmgate_decisions_total{{{SENDER}}}[{window}])",
        by,
    )


class Layout:
    """Places panels left to right on Grafana's 24-column grid, wrapping to a new line."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.panels: list[dict] = []

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append(
            {"type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}}
        )
        self.y += 1

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x = 0
        self.row_h = 0


def _stat(title: str, expr: str, unit: str, description: str, thresholds: list | None = None) -> dict:
    steps = thresholds or [{"color": "green", "value": None}]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, instant=True)],
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "value"},
    }


def _series(title: str, targets: list[dict], unit: str, description: str, stack: bool = False) -> dict:
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, "custom": custom}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]}},
    }


def _table(title: str, expr: str, description: str, hide: tuple[str, ...] = ()) -> dict:
    excluded = {"Time": True, "Value": True, "__name__": True, "job": True, **{h: True for h in hide}}
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": [_target(expr, instant=True, fmt="table")],
        "transformations": [{"id": "organize", "options": {"excludeByName": excluded}}],
        "fieldConfig": {"defaults": {}, "overrides": []},
        "options": {"showHeader": True},
    }


def panels() -> list[dict]:
    lay = Layout()
    red_above = [{"color": "green", "value": None}, {"color": "red", "value": 1}]

    lay.row("Overview")
    lay.add(_stat("Quarantined, last hour", _q_rate("1h"), "percentunit", "Share of decided films quarantined."), 4, 4)
    lay.add(
        _stat(
            "Films decided, last hour",
            f"sum(increase(filmgate_decisions_total{{{SENDER}}}[1h]))",
            "short",
            "Accepted plus quarantined films.",
        ),
        4,
        4,
    )
    lay.add(
        _stat(
            "Spool backlog",
            f"sum(filmgate_spool_depth{{{NODE}}})",
            "short",
            "Instances acknowledged but not yet delivered (incoming + claimed), all nodes.",
            [{"color": "green", "value": None}, {"color": "orange", "value": 100}],
        ),
        4,
        4,
    )
    lay.add(
        _stat(
            "Dead letters, last 24 h",
            f"sum(increase(filmgate_dead_letters_total{{{NODE}}}[24h])) or vector(0)",
            "short",
            "Instances NOT delivered after the last retry; they wait in the dead-letter folder.",
            red_above,
        ),
        4,
        4,
    )
    lay.add(
        _stat(
            "Nodes ready",
            f"sum(filmgate_ready{{{NODE}}}) or vector(0)",
            "short",
            "Nodes accepting associations (readiness).",
        ),
        4,
        4,
    )
    lay.add(
        _stat(
            "Nodes down",
            f"count(up{{{NODE}}} == 0) or vector(0)",
            "short",
            "Scrape targets of job filmgate that do not answer.",
            red_above,
        ),
        4,
        4,
    )
    lay.add(
        _table(
            "Models and provider in use",
            f"filmgate_model_info{{{NODE}}}",
            "Detectors loaded by each node, their version and the onnxruntime provider really in use "
            "(CUDAExecutionProvider or CPUExecutionProvider).",
        ),
        24,
        6,
    )

    lay.row("Quarantine")
    lay.add(
        _series(
            "Quarantine rate",
            [_target(_q_rate(), "now", "A"), _target(_q_rate("1d"), "usual (last day)", "B")],
            "percentunit",
            "Share of decided films quarantined, against its level over the last day (alert: far above usual).",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Quarantine reasons (share of decided films)",
            [
                _target(
                    f"sum by (reason) (rate(filmgate_quarantine_reasons_total{{{SENDER}}}[{W}]))"
                    f" / on () group_left () sum(rate(filmgate_decisions_total{{{SENDER}}}[{W}]))",
                    "{{reason}}",
                )
            ],
            "percentunit",
            "A film can carry several reasons. A reason that suddenly dominates points at one scanner or a model.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Quarantine rate by sender",
            [_target(_q_rate(by="calling_ae"), "{{calling_ae}}")],
            "percentunit",
            "Per calling AE title: a scanner that starts sending rotated or inverted films stands out here.",
        ),
        8,
        8,
    )
    lay.add(
        _table(
            "Quarantine reasons by sender, last 24 h",
            f"sum by (calling_ae, reason) (increase(filmgate_quarantine_reasons_total{{{SENDER}}}[24h])) > 0",
            "Films quarantined per sender and reason over the last day.",
        ),
        24,
        7,
    )

    lay.row("Throughput")
    lay.add(
        _series(
            "Films received by sender",
            [
                _target(
                    f"sum by (calling_ae) (rate(filmgate_instances_received_total{{{SENDER}}}[{W}]))", "{{calling_ae}}"
                )
            ],
            "ops",
            "Instances acknowledged (durably spooled) per second.",
            stack=True,
        ),
        6,
        8,
    )
    lay.add(
        _series(
            "Decisions",
            [_target(f"sum by (outcome) (rate(filmgate_decisions_total{{{SENDER}}}[{W}]))", "{{outcome}}")],
            "ops",
            "Films decided per second, accepted and quarantined.",
            stack=True,
        ),
        6,
        8,
    )
    lay.add(
        _series(
            "Bytes received by sender",
            [_target(f"sum by (calling_ae) (rate(filmgate_bytes_received_total{{{SENDER}}}[{W}]))", "{{calling_ae}}")],
            "Bps",
            "Dataset bytes received per second.",
            stack=True,
        ),
        6,
        8,
    )
    lay.add(
        _series(
            "Associations",
            [
                _target(
                    f"sum by (calling_ae, result) (rate(filmgate_associations_total{{{NODE}}}[{W}]))",
                    "{{calling_ae}} {{result}}",
                )
            ],
            "ops",
            "Association requests; 'rejected' means a sender not on the allow-list (or a wrong called AE title).",
        ),
        6,
        8,
    )

    lay.row("Latency")
    lay.add(
        _series(
            "End to end (received to delivered)",
            _quantiles("filmgate_end_to_end_seconds"),
            "s",
            "From the C-STORE acknowledgement to delivery at every destination.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "C-STORE handler (persist)",
            _quantiles("filmgate_store_seconds"),
            "s",
            "Time the sender waits per instance: checks, write, fsync, rename.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Decode by transfer syntax",
            _quantiles("filmgate_decode_seconds", "transfer_syntax"),
            "s",
            "Read and decode one film to a grey image, by transfer syntax (JPEG 2000 is the slow one).",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Inference by model",
            _quantiles("filmgate_inference_seconds", "model"),
            "s",
            "Per film (batch time divided by batch size). Much slower on CPU than on CUDA: see the provider above.",
        ),
        12,
        8,
    )
    lay.add(
        _series(
            "Preprocess by model",
            _quantiles("filmgate_preprocess_seconds", "model"),
            "s",
            "Resize and normalise one film for a model.",
        ),
        12,
        8,
    )

    lay.row("Spool and delivery")
    lay.add(
        _series(
            "Spool depth",
            [_target(f"sum by (instance, state) (filmgate_spool_depth{{{NODE}}})", "{{instance}} {{state}}")],
            "short",
            "incoming: acknowledged, waiting for a worker; claimed: being decided or delivered. Growing = backlog.",
            stack=True,
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Delivery attempts, retries and failures",
            [
                _target(
                    f"sum by (destination) (rate(filmgate_delivery_attempts_total{{{NODE}}}[{W}]))",
                    "{{destination}} attempts",
                    "A",
                ),
                _target(
                    f"sum by (destination) (rate(filmgate_delivery_retries_total{{{NODE}}}[{W}]))",
                    "{{destination}} retries",
                    "B",
                ),
                _target(
                    f"sum by (destination) (rate(filmgate_delivery_failures_total{{{NODE}}}[{W}]))",
                    "{{destination}} failures",
                    "C",
                ),
            ],
            "ops",
            "Per destination. Failures are retried with exponential back-off before dead-lettering.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Dead letters and C-STORE failures",
            [
                _target(
                    f"sum by (destination) (increase(filmgate_dead_letters_total{{{NODE}}}[1h]))",
                    "dead letters {{destination}} (1 h)",
                    "A",
                ),
                _target(
                    f"sum by (status) (increase(filmgate_store_failures_total{{{NODE}}}[1h]))",
                    "C-STORE failure {{status}} (1 h)",
                    "B",
                ),
            ],
            "short",
            "Dead letters were not delivered; C-STORE failures were answered to the sender with that status.",
        ),
        8,
        8,
    )
    lay.row("Review")
    lay.add(
        _stat(
            "Awaiting review",
            f"sum(filmgate_review_pending{{{NODE}}}) or vector(0)",
            "short",
            "Quarantined films (or, in shadow mode, would-be quarantined) nobody has released or confirmed yet.",
            [{"color": "green", "value": None}, {"color": "orange", "value": 200}],
        ),
        4,
        4,
    )
    lay.add(
        _stat(
            "Shadow mode",
            f"max(filmgate_shadow_mode{{{NODE}}}) or vector(0)",
            "short",
            "1: policy.mode is shadow, every film is delivered to the accept route; the panels below show what "
            "enforcing would have held back.",
        ),
        4,
        4,
    )
    lay.add(
        _series(
            "Awaiting review by reason",
            [_target(f"sum by (reason) (filmgate_review_pending{{{NODE}}})", "{{reason}}")],
            "short",
            "Films awaiting review, by their first reason (read from the decision index at each scrape).",
            stack=True,
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Released and confirmed by reason",
            [
                _target(f'sum by (reason) (filmgate_reviewed{{{NODE}, state="released"}})', "released {{reason}}",
                        "A"),  # fmt: skip
                _target(f'sum by (reason) (filmgate_reviewed{{{NODE}, state="confirmed"}})', "confirmed {{reason}}",
                        "B"),  # fmt: skip
            ],
            "short",
            "Reviewed films. Many releases for one reason = that detector holds back good films at this site: "
            "relabel them and fine-tune (docs/OPERATIONS.md), or calibrate its threshold.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Review actions and logins",
            [
                _target(f"sum by (action) (increase(filmgate_review_actions_total{{{NODE}}}[1h]))", "{{action}} (1 h)",
                        "A"),  # fmt: skip
                _target(
                    f'sum by (method) (increase(filmgate_logins_total{{{NODE}, result!="ok"}}[1h]))',
                    "failed or throttled logins {{method}} (1 h)",
                    "B",
                ),
            ],
            "short",
            "Releases, confirmations and relabels per hour; failed and throttled console/API logins.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Shadow mode: would have quarantined, by reason",
            [_target(f"sum by (reason) (rate(filmgate_shadow_would_quarantine_total{{{NODE}}}[{W}]))", "{{reason}}")],
            "ops",
            "Films shadow mode delivered that enforcing would have quarantined.",
        ),
        8,
        8,
    )
    lay.add(
        _series(
            "Routed",
            [_target(f"sum by (route) (rate(filmgate_routed_total{{{NODE}}}[{W}]))", "{{route}}")],
            "ops",
            "Where films went (differs from the decisions in shadow mode); releases are not counted here.",
        ),
        8,
        8,
    )
    for i, p in enumerate(lay.panels, start=1):
        p["id"] = i
    return lay.panels


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": True,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard() -> dict:
    return {
        "uid": "filmgate",
        "title": "filmgate",
        "description": "DICOM quality gate: quarantine, throughput, latency, spool, delivery, models, review.",
        "tags": ["filmgate", "dicom"],
        "timezone": "browser",
        "editable": False,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                _variable("instance", "Node", 'label_values(up{job="filmgate"}, instance)'),
                _variable("calling_ae", "Sender", 'label_values(filmgate_decisions_total{job="filmgate"}, calling_ae)'),
            ]
        },
        "annotations": {"list": []},
        "links": [],
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
