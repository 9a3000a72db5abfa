"""Configuration: defaults work, every error names its key, check-config validates without starting."""

from __future__ import annotations

import subprocess
import sys

import pytest

from filmgate.config import (
    Config,
    ConfigError,
    DicomDestinationConfig,
    FolderDestinationConfig,
    load_config,
    parse_config,
)
from tests.helpers import REPO


def test_defaults_match_the_contract(monkeypatch):
    monkeypatch.delenv("FILMGATE_CONFIG", raising=False)
    cfg = load_config(None)
    assert cfg.listener.ae_title == "FILMGATE" and cfg.listener.port == 11112 and cfg.http.port == 9108
    assert cfg.spool.path == "var/spool" and cfg.detectors.models_dir == ""
    assert cfg.listener.allow_list and cfg.listener.allow[0].hosts == ("127.0.0.0/8", "::1")
    assert [d.path for d in cfg.destinations] == ["var/out/accept", "var/out/quarantine"]
    assert cfg.policy.modalities == ("CR", "DX") and cfg.policy.pediatric_age_years == 10


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        Config().listener.port = 1  # type: ignore[misc]


def test_full_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        """
listener: {ae_title: GATE, port: 104, allow: [{ae_title: PACS, hosts: [10.0.0.0/8]}]}
policy: {thresholds: {orientation: 0.7}, pediatric_rule: false}
destinations:
  research: {type: dicom, ae_title: RESEARCH, host: pacs.local, port: 4242, retries: 3}
  hold: {type: folder, path: /tmp/hold, layout: "{reason}/{SOPInstanceUID}.dcm"}
routes: {accept: [research], quarantine: [hold]}
"""
    )
    cfg = load_config(path)
    assert cfg.listener.allow[0].ae_title == "PACS" and cfg.policy.thresholds["orientation"] == 0.7
    assert isinstance(cfg.destinations[0], DicomDestinationConfig) and cfg.destinations[0].retries == 3
    assert isinstance(cfg.destinations[1], FolderDestinationConfig)


def test_one_registry_names_each_destination_type_its_config_and_its_implementation(tmp_path):
    """``type:`` is read through filmgate.destinations.DESTINATION_TYPES and the node builds each destination from
    the same entry: a config of each registered type becomes that type's config class and implementation."""
    from filmgate import destinations
    from filmgate.spool import Spool

    specs = {"folder": {"path": str(tmp_path / "out")}, "dicom": {"ae_title": "PEER", "host": "127.0.0.1", "port": 1}}
    assert set(destinations.DESTINATION_TYPES) == set(specs)
    cfg = parse_config({"destinations": {f"d-{k}": {"type": k, **v} for k, v in specs.items()},
                        "routes": {"accept": ["d-folder"], "quarantine": ["d-dicom"]}})  # fmt: skip
    built = destinations.build(cfg.destinations, Spool(tmp_path / "spool"))
    for kind in specs:
        entry = destinations.DESTINATION_TYPES[kind]
        config = next(d for d in cfg.destinations if d.name == f"d-{kind}")
        assert type(config) is entry.config and type(built[f"d-{kind}"]) is entry.factory
    with pytest.raises(ConfigError, match=r"destinations.x.type: must be one of \['dicom', 'folder'\]"):
        parse_config({"destinations": {"x": {"type": "s3"}}})


@pytest.mark.parametrize(
    "data,key",
    [
        ({"listener": {"prot": 1}}, "listener.prot"),
        ({"listener": {"port": "eleven"}}, "listener.port"),
        ({"listener": {"port": 70000}}, "listener.port"),
        ({"listener": {"ae_title": "A" * 17}}, "listener.ae_title"),
        ({"listener": {"allow": [{"hosts": ["not a host!"]}]}}, "listener.allow[0].hosts[0]"),
        ({"listener": {"tls": {"enabled": True}}}, "listener.tls.cert_file"),
        ({"listener": {"extra_storage_sop_classes": ["1.2.abc"]}}, "listener.extra_storage_sop_classes[0]"),
        ({"http": {"max_connections": 0}}, "http.max_connections"),
        ({"http": {"request_timeout": 0}}, "http.request_timeout"),
        ({"policy": {"thresholds": {"orientation": "high"}}}, "policy.thresholds.orientation"),
        ({"policy": {"modality_rule": "yes"}}, "policy.modality_rule"),
        ({"detectors": {"provider": "tpu"}}, "detectors.provider"),
        ({"routes": {"accept": ["nowhere"]}}, "routes.accept"),
        ({"destinations": {"x": {"type": "ftp"}}}, "destinations.x.type"),
        ({"destinations": {"x": {"type": "folder"}}}, "destinations.x.path"),
        ({"destinations": {"accept": {"type": "folder", "path": "a", "layout": "{PatientName}.dcm"}}},
         "destinations.accept.layout"),
        ({"destinations": {"p": {"type": "dicom", "ae_title": "P", "host": "h", "port": 1, "retries": -1}}},
         "destinations.p.retries"),
        ({"workers": {"max_batch": 0}}, "workers.max_batch"),
        ({"logging": {"level": "LOUD"}}, "logging.level"),
        ({"sppol": {}}, "sppol"),
    ],
)  # fmt: skip
def test_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert str(exc.value).startswith(key), str(exc.value)


def test_check_config_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("listener: {port: 11113}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listener: {port: 11113, bind: 0.0.0.0}\n")
    run = [sys.executable, "-m", "filmgate.cli", "check-config"]
    ok = subprocess.run([*run, str(good)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout
    ko = subprocess.run([*run, str(bad)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert ko.returncode == 2 and "listener.bind: unknown key" in ko.stderr


def test_serve_refuses_an_invalid_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("policy: {pediatric_age_years: -1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "serve", "--config", str(bad)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "policy.pediatric_age_years" in proc.stderr


def test_shipped_default_yaml_is_the_defaults():
    path = REPO / "service" / "default.yaml"
    cfg = load_config(path)
    assert cfg == Config(source=str(path))


def test_serve_refuses_to_start_without_detectors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"listener: {{port: 0}}\nhttp: {{enabled: false}}\nspool: {{path: {tmp_path / 'spool'}}}\n"
        f"detectors: {{models_dir: {tmp_path / 'nothing'}}}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "serve", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "detectors.models_dir" in proc.stderr and "detectors.require: false" in proc.stderr
