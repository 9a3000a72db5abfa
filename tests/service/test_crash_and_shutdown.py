"""Durability: `kill -9` in the middle of a burst, then a restart, delivers every acknowledged instance; SIGTERM
stops accepting, reports not ready, finishes or hands back what it holds, exits 0, and a restart finishes the rest."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from filmgate.index import DecisionIndex, Query
from filmgate.spool import Spool
from tests.helpers import Gate, sha, wait_for


class Burst(threading.Thread):
    """Send ``count`` copies of a film (new UIDs) over one association; records what was acknowledged."""

    def __init__(self, port: int, template, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.template, self.count = port, template, count
        self.acked: list[str] = []
        self.failed = 0

    def run(self) -> None:
        from pynetdicom import AE

        ae = AE(ae_title="BURST")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
        ae.add_requested_context(self.template.SOPClassUID, [self.template.file_meta.TransferSyntaxUID])
        assoc = ae.associate("127.0.0.1", self.port, ae_title="FILMGATE")
        if not assoc.is_established:
            return
        for _ in range(self.count):
            ds = Dataset()  # a new element dict (Dataset.copy() shares it between threads)
            ds.update(self.template)
            ds.file_meta = self.template.file_meta
            ds[0x00080018] = DataElement(0x00080018, "UI", generate_uid())
            try:
                status = assoc.send_c_store(ds)
            except Exception:
                break
            if status and "Status" in status and status.Status == 0:
                self.acked.append(str(ds.SOPInstanceUID))
            else:
                self.failed += 1
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()


def dx_sized(ds):
    """The film at DX size (2500x2048, 16-bit storage): about 10 MB, so the workers lag behind the senders."""
    import cv2
    import numpy as np

    px = cv2.resize(ds.pixel_array.astype(np.float32), (2048, 2500), interpolation=cv2.INTER_LINEAR)
    ds.Rows, ds.Columns = px.shape
    ds.PixelData = np.clip(px, 0, 4095).astype(np.uint16).tobytes()
    return ds


def _delivered_uids(gate: Gate) -> set[str]:
    return {r["sop_instance_uid"] for r in gate.sidecars()}


def test_kill9_then_restart_delivers_every_acknowledged_instance(tmp_path, made_films, models_dir):
    template = dx_sized(pydicom.dcmread(next(f for f in made_films if f.note == "normal-0").path))
    # Workers at the lowest priority and two senders: the workers fall behind, so the kill finds work in the spool.
    gate = Gate.create(tmp_path, workers={"decode_threads": 1, "max_batch": 2, "nice": 19}).start()
    bursts = [Burst(gate.dicom_port, template, 40) for _ in range(2)]
    spool = tmp_path / "spool"

    def waiting() -> list:
        return list((spool / "incoming").glob("*.dcm")) + list((spool / "claimed").rglob("*.dcm"))

    for b in bursts:
        b.start()
    wait_for(
        lambda: sum(len(b.acked) for b in bursts) >= 16 and waiting(), 60, "16 acknowledged, some still in the spool"
    )
    gate.kill9()
    for b in bursts:
        b.join(30)
    acked = {uid for b in bursts for uid in b.acked}
    left = waiting()
    delivered_before = _delivered_uids(gate)
    print(f"acked {len(acked)}, delivered before restart {len(delivered_before)}, left in spool {len(left)}")
    assert left, "the kill should land while instances wait in the spool (else recovery is not exercised)"
    gate.start()
    try:
        wait_for(lambda: acked <= _delivered_uids(gate), 60, "every acknowledged instance delivered after restart")
    except AssertionError:
        print("missing", acked - _delivered_uids(gate), "extra", _delivered_uids(gate) - acked, [p.name for p in left])
        raise
    assert not list((spool / "claimed").rglob("*.dcm"))
    # the decision index agrees with the spool and the destinations: one row per instance, each delivered
    index = DecisionIndex(spool / "state" / "index.sqlite")
    wait_for(lambda: index.count("WHERE state != 'delivered'") == 0 and index.count() >= len(acked), 30,
             "every index row delivered")  # fmt: skip
    rows = index.query(Query(limit=1000))[0]
    uids = [r["sop_instance_uid"] for r in rows]
    assert len(uids) == len(set(uids)) and set(uids) == _delivered_uids(gate) and acked <= set(uids)
    assert all(r["outcome"] == "accept" and r["calling_ae"] == "BURST" for r in rows)
    assert all([d["state"] for d in index.get(r["id"])["deliveries"]] == ["delivered"] for r in rows)
    index.close()
    assert gate.stop() == 0


@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP to the group"])
def test_sigterm_drains_and_hands_back(tmp_path, made_films, models_dir, how):
    """SIGTERM, and SIGHUP as a closed terminal sends it: to the node and its worker and decode processes at once
    (SIGHUP killed all of them on the spot, undrained; now it stops the node as SIGTERM does)."""
    template = pydicom.dcmread(next(f for f in made_films if f.note == "normal-0").path)
    gate = Gate.create(tmp_path, workers={"decode_threads": 1, "drain_timeout": 20.0})
    gate.start(prefix=["setsid"] if how != "SIGTERM" else [])  # its own process group, as under a terminal
    burst = Burst(gate.dicom_port, template, 60)
    burst.start()
    wait_for(lambda: len(burst.acked) >= 10, 60, "10 acknowledged instances")
    assert gate.proc is not None
    if how == "SIGTERM":
        gate.proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(gate.proc.pid, signal.SIGHUP)
    saw_not_ready = False
    deadline = time.monotonic() + 60
    while gate.proc.poll() is None and time.monotonic() < deadline:
        code, _ = gate.http_get("/readyz")
        saw_not_ready |= code == 503
        time.sleep(0.02)
    assert gate.proc.wait(60) == 0, gate.log()[-3000:]
    burst.join(30)
    assert saw_not_ready, "readiness must go false while draining"
    assert "stopped in" in gate.log()
    assert ("SIGHUP: stopping as for SIGTERM" in gate.log()) == (how != "SIGTERM")
    assert "died" not in gate.log(), gate.log()[-3000:]  # no worker or decode process was killed by the signal
    acked = set(burst.acked)
    spool = tmp_path / "spool"
    assert not list((spool / "claimed").rglob("*.dcm")), "claimed work is finished or handed back on SIGTERM"
    records = Spool(spool)
    waiting = {records.arrival(p).sop_instance_uid for p in records.pending()}
    assert acked <= _delivered_uids(gate) | waiting, "every acknowledged instance is delivered or still spooled"
    gate.start()
    wait_for(lambda: acked <= _delivered_uids(gate), 120, "the rest delivered after restart")
    assert gate.stop() == 0


def test_connections_that_hung_up_before_associating_do_not_hold_up_a_stop(tmp_path, models_dir):
    """A probe, a PDU refused for its length, garbage: each connection is gone, but pynetdicom's acceptor thread used
    to wait out the ACSE timeout for its request, and SIGTERM waited for those threads (ten seconds, then aborted
    them). Now the node stops as fast as an idle one, with nothing left to abort."""
    import re

    from tests import hostile

    gate = Gate.create(tmp_path, listener={"acse_timeout": 30.0}, workers={"processes": 0}).start()
    for data in hostile.HANG_UPS.values():
        hostile.hang_up(gate.dicom_port, data)
    assert gate.stop() == 0
    log = gate.log()
    took = float(re.search(r"stopped in ([0-9.]+) s \(drained\)", log).group(1))  # type: ignore[union-attr]
    assert took < 5.0, log[-3000:]  # the old wait was 10 s; an idle node stops in well under 1 s
    assert "still open after" not in log


def test_instances_spooled_by_the_previous_version_are_judged_after_an_upgrade(tmp_path, made_films, models_dir):
    """The previous version kept the sender in the spool file's name (no arrival record): such instances are still
    recovered, judged and delivered with their sender. A film whose header cannot be read is judged as one without a
    header, exactly as `filmgate inspect` judges it: `undecodable`, and no `modality`."""
    film = next(f for f in made_films if f.note == "normal-1")
    incoming = tmp_path / "spool" / "incoming"
    incoming.mkdir(parents=True)
    good = incoming / f"{time.time_ns():020d}001_{b'OLDPACS'.hex()}_{film.uid}.dcm"
    good.write_bytes(film.path.read_bytes())
    (incoming / f"{time.time_ns():020d}002_{b'OLDPACS'.hex()}_1.2.3.999.dcm").write_bytes(
        b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00\xff\xff"  # file meta cut short: no header
    )
    gate = Gate.create(tmp_path).start()
    try:
        records = {r["sop_instance_uid"]: r for r in gate.wait_delivered(2, timeout=60)}
    finally:
        assert gate.stop() == 0
    assert records[film.uid]["calling_ae"] == "OLDPACS" and records[film.uid]["decision"] == film.expect
    bad = records["1.2.3.999"]
    assert bad["calling_ae"] == "OLDPACS" and bad["reasons"] == ["undecodable"], bad["reasons"]
    assert sha(Path(records[film.uid]["_path"]).read_bytes()) == sha(film.path.read_bytes())
    assert not list(incoming.iterdir()), "nothing left in the spool"
