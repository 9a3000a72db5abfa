"""No film can stall or loop (issue 9, item 2): every failure while judging ends in quarantine with a reason and a
note, a film without layout fields lands under ``unknown``, a stage thread that dies or stalls is started again by the
watchdog (and counted), and retries of one instance are bounded: then the pipeline's dead letter, with a note, which
``filmgate resend`` puts back."""

from __future__ import annotations

import ctypes
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from filmgate.config import parse_config
from filmgate.destinations import Delivery, FolderDestination
from filmgate.detectors import DetectorSet
from filmgate.judge import Judge
from filmgate.pipeline import Pipeline
from filmgate.record import Arrival
from filmgate.spool import Spool
from tests import hostile
from tests.helpers import REPO, Gate, send_file_raw, wait_for, write_with_meta


def restarts(stage: str, cause: str) -> float:
    return REGISTRY.get_sample_value("filmgate_stage_restarts_total", {"stage": stage, "cause": cause}) or 0.0


# ------------------------------------------------------------------------------------------ through the real node


def test_a_film_whose_full_read_fails_is_quarantined_under_unknown_with_a_note(tmp_path):
    """Its header passes the listener's check (UIDs first), the rest cannot be read: no StudyInstanceUID, no loop."""
    uid = "1.2.826.0.1.3680043.8.498.1"
    payload = (b"\x08\x00\x16\x00UI\x1c\x001.2.840.10008.5.1.4.1.1.1.1\x00"  # SOPClassUID
               b"\x08\x00\x18\x00UI\x1c\x00" + uid.encode() + b"\x00"  # SOPInstanceUID
               + b"\x09\x00\x10\x10OB\x00\x00\xff\xff\xff\x7f" + b"\x00" * 64)  # fmt: skip  # a 2 GB value, 64 bytes
    bad = write_with_meta(tmp_path / "bad.dcm", payload, "1.2.840.10008.5.1.4.1.1.1.1", uid)
    panic = hostile.panicking_rle(tmp_path / "panic.dcm")
    good = hostile.save(hostile.small_dataset(), tmp_path / "good.dcm")
    gate = Gate.create(tmp_path / "node", quarantine_layout="{reason}/{StudyInstanceUID}/{SOPInstanceUID}.dcm",
                       workers={"processes": 1}).start()  # fmt: skip
    try:
        assert send_file_raw(gate.dicom_port, bad) == 0
        assert send_file_raw(gate.dicom_port, panic) == 0
        assert send_file_raw(gate.dicom_port, good) == 0
        found = gate.wait_delivered(3, timeout=60)
        by_uid = {r["sop_instance_uid"]: r for r in found}
        rec = by_uid[uid]
        assert rec["reasons"][0] == "undecodable" and rec["notes"]["error"]
        assert Path(rec["_path"]).relative_to(tmp_path / "node" / "quarantine").as_posix() == (
            f"undecodable/unknown/{uid}.dcm")
        assert "PanicException" in by_uid[str(hostile.pydicom_uid(panic))]["notes"]["error"]
        spool = tmp_path / "node" / "spool"
        waiting = lambda: [p for p in spool.rglob("*.dcm") if p.relative_to(spool).parts[0] in ("incoming", "claimed")]  # noqa: E731
        wait_for(lambda: not waiting(), 10, "nothing left waiting in the spool")
    finally:
        assert gate.stop() == 0


# ------------------------------------------------------------------------------------------ the pipeline in-process


class Stuck:
    """A destination whose first delivery hangs until released (a hung NFS mount, a frozen disk)."""

    def __init__(self, inner: FolderDestination) -> None:
        self.name = inner.name
        self.inner = inner
        self.release = threading.Event()
        self.calls = 0

    def deliver(self, item: Delivery) -> None:
        self.calls += 1
        if self.calls == 1:
            self.release.wait(60)
        self.inner.deliver(item)

    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...


class Refusing:
    """A destination that always fails (a folder on a volume that is full)."""

    name = "refusing"

    def deliver(self, item: Delivery) -> None:
        raise OSError(28, "No space left on device")

    def start(self) -> None: ...
    def stop(self, timeout: float) -> None: ...


def pipeline(tmp_path: Path, dest_for, **workers) -> tuple[Pipeline, Spool]:
    cfg = parse_config({
        "spool": {"path": str(tmp_path / "spool"), "fsync": False},
        "limits": {"decode_timeout": 0.5, "decode_isolation": False},
        "workers": {"processes": 0, "stall_timeout": 1.0, "retry_delay": 0.05, "max_attempts": 3, **workers},
        "detectors": {"require": False},
        "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out"), "fsync": False,
                                 "layout": "{SOPInstanceUID}.dcm"}},
        "routes": {"accept": ["out"], "quarantine": ["out"]},
    })  # fmt: skip
    spool = Spool(cfg.spool.path, fsync=False)
    folder = FolderDestination(cfg.destinations[0], spool)
    p = Pipeline(cfg, spool, Judge(cfg, DetectorSet([])), {"out": dest_for(folder)})
    return p, spool


def spool_films(spool: Spool, tmp_path: Path, n: int) -> list[str]:
    uids = []
    for i in range(n):
        ds = hostile.small_dataset(seed=i)
        arrival = Arrival(received_at=0.0, calling_ae="TEST", sop_instance_uid=str(ds.SOPInstanceUID))
        spool.persist(hostile.save(ds, tmp_path / f"in{i}.dcm").read_bytes(), arrival)
        uids.append(str(ds.SOPInstanceUID))
    return uids


def test_the_watchdog_restarts_a_stalled_stage_and_the_film_is_delivered_once(tmp_path):
    stuck: list[Stuck] = []
    p, spool = pipeline(tmp_path, lambda f: stuck.append(Stuck(f)) or stuck[0])
    uids = spool_films(spool, tmp_path, 4)
    before = restarts("deliver", "stalled")
    p.start()
    try:
        out = tmp_path / "out"
        wait_for(lambda: restarts("deliver", "stalled") == before + 1, 30, "the stalled delivery stage restarted")
        wait_for(lambda: {f"{u}.dcm" for u in uids} <= {x.name for x in out.glob("*.dcm")}, 30, "all delivered")
        stuck[0].release.set()  # the abandoned thread wakes up: it must not deliver its film again
        wait_for(lambda: not list(spool.root.rglob("*.dcm")), 10, "an empty spool")
        assert sorted(x.name for x in out.glob("*.dcm")) == sorted(f"{u}.dcm" for u in uids), "each once"
    finally:
        stuck[0].release.set()
        p.stop(10)


def test_the_watchdog_restarts_a_stage_thread_that_died(tmp_path):
    p, spool = pipeline(tmp_path, lambda f: f)
    before = restarts("decode", "died")
    p.start()
    try:
        decoder = p._stages["decode-0"].thread
        # Make the idle decode thread die as a bug escaping its loop would (an exception raised inside it).
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(decoder.ident), ctypes.py_object(SystemExit))
        wait_for(lambda: restarts("decode", "died") == before + 1, 30, "the dead decode stage restarted")
        assert p._stages["decode-0"].thread is not decoder and p._stages["decode-0"].thread.is_alive()
        uids = spool_films(spool, tmp_path, 2)
        wait_for(lambda: len(list((tmp_path / "out").glob("*.dcm"))) == 2, 30, "films judged after the restart")
        assert {x.stem for x in (tmp_path / "out").glob("*.dcm")} == set(uids)
    finally:
        p.stop(10)


def test_retries_are_bounded_then_the_pipeline_dead_letter_and_resend(tmp_path):
    p, spool = pipeline(tmp_path, lambda f: Refusing())
    uids = spool_films(spool, tmp_path, 2)
    p.start()
    dead = spool.root / "dead-letter" / "pipeline"
    try:
        wait_for(lambda: len(list(dead.glob("*.dcm"))) == 2, 30, "both dead-lettered after max_attempts")
    finally:
        p.stop(10)
    notes = [json.loads(n.read_text()) for n in dead.glob("*.json") if not n.name.endswith(".arrival.json")]
    assert len(notes) == 2 and all(n["attempts"] == 3 and "No space left" in n["error"] for n in notes)
    assert not list(spool.incoming.iterdir()), "nothing left behind in incoming/"
    # Fixed: resend puts them back into incoming/, and a pipeline with a working destination delivers them.
    cfg_path = tmp_path / "resend.yaml"
    cfg_path.write_text(json.dumps({"spool": {"path": str(spool.root)}, "detectors": {"require": False},
                                    "destinations": {"out": {"type": "folder", "path": str(tmp_path / "out")}},
                                    "routes": {"accept": ["out"], "quarantine": ["out"]}}))  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "filmgate.cli", "resend", "--config", str(cfg_path), str(dead)],
                         cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert run.returncode == 0 and "2 instance(s) queued again for pipeline" in run.stdout, run.stderr
    assert len(list(spool.incoming.glob("*.dcm"))) == 2 and not list(dead.iterdir())
    p2, _ = pipeline(tmp_path, lambda f: f)
    p2.start()
    try:
        wait_for(lambda: len(list((tmp_path / "out").glob("*.dcm"))) == 2, 30, "resent films delivered")
        assert {x.stem for x in (tmp_path / "out").glob("*.dcm")} == set(uids)
    finally:
        p2.stop(10)


def test_a_film_taken_up_too_often_is_quarantined_with_a_note_not_judged_again(tmp_path):
    """What a worker that dies on a film leaves behind: its attempt count, kept beside it in the spool."""
    p, spool = pipeline(tmp_path, lambda f: f)
    (uid,) = spool_films(spool, tmp_path, 1)
    (instance,) = spool.pending()
    (spool.incoming / (instance.stem + ".attempts")).write_text("3")  # three deaths so far, max_attempts is 3
    p.start()
    try:
        side = wait_for(lambda: next((tmp_path / "out").glob("*.json"), None), 30, "the film delivered")
        rec = json.loads(side.read_text())
        assert rec["reasons"] == ["undecodable"] and "taken up 3 times" in rec["notes"]["error"]
        assert rec["sop_instance_uid"] == uid == side.stem, "named by the UID the listener read"
        wait_for(lambda: not list(spool.root.rglob("*.attempts")), 10, "its attempt count gone with it")
    finally:
        p.stop(10)


@pytest.mark.parametrize("key,value", [("max_attempts", 0), ("stall_timeout", 30.0)])
def test_bounds_are_checked(key, value):
    with pytest.raises(ValueError, match=f"workers.{key}"):
        parse_config({"workers": {key: value}})
