"""A configuration that check-config accepts, serve accepts (issue 9, item 8): the node started from a copy of its own
``service/default.yaml``, and from a file with every documented example, becomes ready with its worker processes and
gets a film through them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO, Gate, Receiver, free_port, send_file_raw, wait_for

DEFAULT_YAML = REPO / "service" / "default.yaml"


def _worker_processes(gate: Gate) -> list[str]:
    assert gate.proc is not None
    children = Path(f"/proc/{gate.proc.pid}/task/{gate.proc.pid}/children").read_text().split()
    return [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def _copy_of_default(folder: Path, dicom_port: int, http_port: int) -> str:
    """service/default.yaml as shipped, with only the two ports moved to free ones (tests run side by side)."""
    text = DEFAULT_YAML.read_text()
    text, n = re.subn(r"(?m)^(  port: )11112\b", rf"\g<1>{dicom_port}", text)
    assert n == 1
    text, n = re.subn(r"(?m)^(  port: )9108\b", rf"\g<1>{http_port}", text)
    assert n == 1
    return text


def _gate_from_text(root: Path, text: str, dicom_port: int, http_port: int) -> Gate:
    gate = Gate(root=root, dicom_port=dicom_port, http_port=http_port, config=yaml.safe_load(text))
    gate.config_path.write_text(text)  # the text itself, comments and all, not a re-dump
    check = subprocess.run([sys.executable, "-m", "filmgate.cli", "check-config", str(gate.config_path)],
                           cwd=root, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert check.returncode == 0, check.stderr
    return gate


def test_serve_starts_with_worker_processes_from_a_copy_of_default_yaml(tmp_path, made_films):
    dicom_port, http_port = free_port(), free_port()
    gate = _gate_from_text(tmp_path, _copy_of_default(tmp_path, dicom_port, http_port), dicom_port, http_port)
    gate.start(cwd=tmp_path)  # relative paths (var/spool, var/out/...) under the working folder, as documented
    try:
        assert len(_worker_processes(gate)) == 2  # workers.processes: 2, with the config pickled to them
        assert send_file_raw(dicom_port, made_films[0].path) == 0
        wait_for(lambda: list((tmp_path / "var" / "out").rglob("*.json")), 90, "the film judged by a worker process")
    finally:
        assert gate.stop() == 0


def test_serve_starts_with_every_documented_example(tmp_path, made_films):
    """policy.thresholds and policy.outranks set (MappingProxyType could not be pickled to the workers), the
    commented DICOM destination of default.yaml enabled, the allow rule and routes of docs/OPERATIONS.md."""
    dicom_port, http_port, pacs_port = free_port(), free_port(), free_port()
    cfg = yaml.safe_load(_copy_of_default(tmp_path, dicom_port, http_port))
    cfg["policy"]["thresholds"] = {"orientation": 0.6}  # the example in default.yaml
    cfg["policy"]["outranks"] = {"not-frontal-chest": ["flipped", "pediatric", "atypical"], "modality": ["rotated"]}
    cfg["listener"]["allow"].append({"ae_title": "PACS_MAIN", "hosts": ["10.20.30.40"]})  # OPERATIONS.md
    cfg["destinations"]["research-pacs"] = {  # default.yaml's commented example, pointed at a real receiver
        "type": "dicom", "ae_title": "RESEARCH", "host": "127.0.0.1", "port": pacs_port, "calling_ae": "FILMGATE",
        "retries": 8, "backoff_initial": 1.0, "backoff_factor": 2.0, "backoff_max": 300.0, "timeout": 30.0,
        "dead_letter": "",
    }  # fmt: skip
    cfg["routes"] = {"accept": ["research-pacs"], "quarantine": ["quarantine"]}  # OPERATIONS.md
    pacs = Receiver(pacs_port, "RESEARCH")
    pacs.start()
    gate = _gate_from_text(tmp_path, yaml.safe_dump(cfg), dicom_port, http_port)
    gate.start(cwd=tmp_path)
    try:
        assert len(_worker_processes(gate)) == 2
        normal = next(f for f in made_films if f.expect == "accept")
        assert send_file_raw(dicom_port, normal.path) == 0
        wait_for(lambda: normal.uid in pacs.uids(), 90, "the accepted film forwarded by a worker process")
    finally:
        assert gate.stop() == 0
        pacs.stop()
