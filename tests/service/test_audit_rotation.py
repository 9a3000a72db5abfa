"""The audit trail survives log rotation: the shipped logrotate file, run by the real logrotate against a running node.

Every process of the node (the listener writes ``stored``, the worker processes ``decided`` and ``delivered``) keeps
the audit file open. Before the node checked the path, a ``create`` rotation left all of them appending to the
rotated file, which the next rotation compressed: every event after the first rotation was lost, while the new file
at the path stayed empty. Here films are sent between rotations, and every event of every film must be found exactly
once, in the file that was at the path while it happened, none lost across three files (one of them compressed).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from pathlib import Path

import pytest

from filmgate.audit import AuditLog
from tests.helpers import REPO, Gate, film_pixels, make_dicom, storescu, wait_for

SHIPPED = REPO / "deploy" / "logrotate" / "filmgate"
EVENTS = ("stored", "decided", "delivered")


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in text.splitlines()]


def logrotate(conf: Path, state: Path) -> None:
    import subprocess

    proc = subprocess.run(["logrotate", "-v", "-f", "-s", str(state), str(conf)], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_the_shipped_logrotate_file_rotates_a_running_nodes_audit_trail_and_no_event_is_lost(tmp_path, val_films):
    assert shutil.which("logrotate"), "logrotate missing (scripts/bootstrap installs it)"
    gate = Gate.create(tmp_path / "gate").start()
    audit = gate.root / "spool" / "audit.jsonl"
    # the shipped file as an operator copies it: only the path changed to this node's
    text = SHIPPED.read_text()
    assert "/var/lib/filmgate/spool/audit.jsonl {" in text
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text.replace("/var/lib/filmgate/spool/audit.jsonl", str(audit)))
    os.chmod(conf, 0o644)
    state = tmp_path / "logrotate.state"
    pixels = film_pixels(val_films["adult"][0])
    sent: list[list[str]] = []
    try:
        for batch in range(3):  # before the first rotation, between the two, after the second
            files = [tmp_path / f"film-{batch}-{i}.dcm" for i in range(2)]
            uids = [make_dicom(pixels, f) for f in files]
            assert storescu(files, gate.dicom_port) == []
            sent.append(uids)

            def logged(uids: list[str] = uids) -> bool:
                seen = {(e["event"], e.get("sop_instance_uid")) for e in events(audit)}
                return all((ev, uid) in seen for ev in EVENTS for uid in uids)

            wait_for(logged, 120, f"the audit events of batch {batch} in {audit}")
            if batch < 2:
                logrotate(conf, state)
                assert not audit.exists() or audit.stat().st_size == 0  # moved away; a new file is made on demand
    finally:
        assert gate.stop() == 0
    files = {"audit.jsonl": events(audit), ".1": events(audit.with_name("audit.jsonl.1")),
             ".2.gz": events(audit.with_name("audit.jsonl.2.gz"))}  # fmt: skip
    # delaycompress: the last rotation's file is plain, the one before it compressed
    assert files[".2.gz"] and files[".1"] and files["audit.jsonl"]
    where = {".2.gz": 0, ".1": 1, "audit.jsonl": 2}
    for name, batch in where.items():
        for uid in (u for b, uids in enumerate(sent) for u in uids):
            mine = uid in sent[batch]
            found = [e["event"] for e in files[name] if e.get("sop_instance_uid") == uid]
            if mine:
                assert sorted(found) == sorted(EVENTS), f"{name}: events of {uid}: {found}"
            else:
                assert not found, f"{name} holds events of {uid} sent in another batch: {found}"
    for lines in files.values():
        assert all("Test^Film" not in json.dumps(e) and "TEST-0001" not in json.dumps(e) for e in lines)


@pytest.mark.parametrize("how", ["moved", "removed"])
def test_an_audit_file_moved_or_removed_is_started_anew_at_its_path(tmp_path, how):
    path = tmp_path / "audit.jsonl"
    one, two = AuditLog(path), AuditLog(path)  # two processes' logs, as the listener's and a worker's
    one.event("stored", sop_instance_uid="1.2.3")
    if how == "moved":
        path.rename(tmp_path / "audit.jsonl.1")
    else:
        path.unlink()
    two.event("decided", sop_instance_uid="1.2.3")
    one.event("delivered", sop_instance_uid="1.2.3")
    assert [e["event"] for e in events(path)] == ["decided", "delivered"]
    if how == "moved":
        assert [e["event"] for e in events(tmp_path / "audit.jsonl.1")] == ["stored"]
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    one.close()
    two.close()
