"""The strict config check: every mistake of a file reported at once, each naming its key and the fix; names of
detectors, reasons and destinations checked against what exists; modality codes normalised or refused; the models
folder must exist and hold a detector. `check-config` and `serve` run the same checks (serve before it listens)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from filmgate.config import ConfigError, load_config, parse_config

# The mistakes that used to pass check-config and change decisions (each is one line of the error).
MISTAKES = """\
detectors:
  models_dir: {missing}
  disabled: [orientatoin]
policy:
  thresholds: {{orientaton: 0.5}}
  reason_order: [undecodable, modality, rotatd]
  outranks: {{not-frontal-chest: [fliped]}}
routes: {{accept: [acept]}}
listener: {{port: 70000}}
"""


def _errors(data) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    return list(exc.value.errors)


def test_modality_codes_are_normalised_to_upper_case():
    cfg = parse_config({"policy": {"modalities": ["cr", " dx"]}})
    assert cfg.policy.modalities == ("CR", "DX")


@pytest.mark.parametrize("code", ["C-R", "chest x-ray", "", "A" * 17])
def test_a_modality_that_is_no_dicom_code_is_refused(code):
    errors = _errors({"policy": {"modalities": ["CR", code]}})
    assert errors == [f"policy.modalities[1]: {code!r} is not a DICOM Modality code (e.g. CR, DX)"]


@pytest.mark.parametrize(
    "data,key,hint",
    [
        ({"policy": {"thresholds": {"orientaton": 0.5}}}, "policy.thresholds.orientaton", "'orientation'"),
        ({"detectors": {"disabled": ["orientatoin"]}}, "detectors.disabled[0]", "'orientation'"),
        ({"policy": {"reason_order": ["rotatd"]}}, "policy.reason_order[0]", "'rotated'"),
        ({"policy": {"outranks": {"not-frontal-chest": ["fliped"]}}}, "policy.outranks.not-frontal-chest[0]",
         "'flipped'"),
        ({"policy": {"outranks": {"lateral": ["flipped"]}}}, "policy.outranks.lateral", "reasons: ["),
        ({"routes": {"quarantine": ["quarantaine"]}}, "routes.quarantine", "defined under destinations"),
    ],
)  # fmt: skip
def test_unknown_names_are_refused_with_the_known_ones(data, key, hint):
    errors = _errors(data)
    assert len(errors) == 1 and errors[0].startswith(key + ":") and hint in errors[0], errors


def test_the_models_folder_must_exist_and_hold_a_detector(tmp_path):
    missing = _errors({"detectors": {"models_dir": str(tmp_path / "nothing")}})
    assert len(missing) == 1 and missing[0].startswith("detectors.models_dir:") and "does not exist" in missing[0]
    assert "detectors.require: false" in missing[0]
    (tmp_path / "empty").mkdir()
    empty = _errors({"detectors": {"models_dir": str(tmp_path / "empty")}})
    assert len(empty) == 1 and "no detector" in empty[0] and "detectors.require: false" in empty[0]
    # Header rules only, asked for: an empty folder is fine then, a missing one still a mistake.
    assert parse_config({"detectors": {"models_dir": str(tmp_path / "empty"), "require": False}})
    every = ["atypical", "flip", "inversion", "orientation", "pediatric", "view"]
    assert "disables every detector" in _errors({"detectors": {"disabled": every}})[0]


def test_every_mistake_at_once_from_a_file_with_key_and_fix(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text(MISTAKES.format(missing=tmp_path / "no-models"))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    errors = exc.value.errors
    keys = [e.split(": ", 2)[1] for e in errors]
    assert all(e.startswith(f"{path}: ") for e in errors), errors
    # The models folder is missing, so detector and reason names cannot be checked against it: reported alone.
    assert keys == ["listener.port", "detectors.models_dir", "routes.accept"], errors
    # With the models found, the names are checked too, all in the same report.
    path.write_text(MISTAKES.format(missing='""'))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    keys = sorted(e.split(": ", 2)[1] for e in exc.value.errors)
    assert keys == sorted([
        "listener.port", "detectors.disabled[0]", "policy.thresholds.orientaton", "policy.reason_order[2]",
        "policy.outranks.not-frontal-chest[0]", "routes.accept",
    ]), exc.value.errors  # fmt: skip


def test_type_errors_are_all_reported_too():
    errors = _errors({"listener": {"port": "eleven", "prot": 1}, "workers": {"max_batch": "8"}, "sppol": {}})
    assert [e.split(":")[0] for e in errors] == ["sppol", "listener.prot", "listener.port", "workers.max_batch"]


@pytest.mark.parametrize("command", [["check-config"], ["serve", "--config"]])
def test_check_config_and_serve_report_the_same_list(tmp_path, command):
    path = tmp_path / "site.yaml"
    path.write_text(MISTAKES.format(missing='""'))
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", *command, str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == "filmgate: invalid configuration (6 errors):", proc.stderr
    assert len(lines) == 7 and all(line.startswith(f"  {path}: ") for line in lines[1:]), proc.stderr
    assert "did you mean 'rotated'?" in proc.stderr and "did you mean 'orientation'?" in proc.stderr


def test_field_constraints_are_declared_beside_the_fields_and_checked_by_one_walk():
    """Each field's own constraint is field metadata (filmgate.config_checks), checked by typed_config.field_errors
    through nested sections, tuples of them ([i]) and destinations (by name); validate() runs it on any Config, not
    only on one read from YAML."""
    import dataclasses

    from filmgate.config import Config, ListenerConfig, SenderRule, validate
    from filmgate.typed_config import field_errors

    assert field_errors(Config()) == []  # the defaults meet every constraint
    port = next(f for f in dataclasses.fields(ListenerConfig) if f.name == "port")
    assert "check" in port.metadata
    built = Config(listener=ListenerConfig(port=-1, allow=(SenderRule("*"), SenderRule("A\\B", ("not a host!",)))))
    with pytest.raises(ConfigError) as exc:
        validate(built, check_models=False)
    assert [e.split(":")[0] for e in exc.value.errors] == [
        "listener.port", "listener.allow[1].ae_title", "listener.allow[1].hosts[0]",
    ]  # fmt: skip
    errors = _errors({"destinations": {"pacs": {"type": "dicom", "ae_title": "P", "host": "h", "port": 1,
                                                "tls": {"min_version": "SSLv3"}},
                                       "q": {"type": "folder", "path": ""}},
                      "routes": {"accept": ["pacs"], "quarantine": ["q"]}})  # fmt: skip
    assert errors == [
        "destinations.pacs.tls.min_version: must be one of ('TLSv1.2', 'TLSv1.3') (BCP 195), got 'SSLv3'",
        "destinations.q.path: must not be empty",
    ]
