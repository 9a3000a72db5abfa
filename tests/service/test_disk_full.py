"""A full spool is an answer, not an abort (issue 9, item 3), on a really full file system: the node runs in its own
mount namespace with its spool on a 48 MiB tmpfs (``unshare -m``), and the test fills that tmpfs through the node's
own view of it (``/proc/<pid>/root``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np

from tests.helpers import DCMTK_ENV, Gate, make_dicom, normalise, send_file_raw, wait_for

MIB = 1024 * 1024
RESERVE = 8 * MIB


def _free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _fill_to(filler: Path, spool: Path, free_left: int) -> None:
    """Grow ``filler`` so that ``free_left`` bytes stay free on the spool's file system."""
    size = filler.stat().st_size if filler.exists() else 0
    target = size + _free(spool) - free_left
    with open(filler, "ab") as fh:  # written, not truncated: a sparse file would not fill the tmpfs
        while size < target:
            size += fh.write(b"\xff" * min(MIB, target - size))


def _storescu_status(path: Path, port: int) -> str:
    proc = subprocess.run(["storescu", "-v", "-aet", "DISKTEST", "-aec", "FILMGATE", "127.0.0.1", str(port), str(path)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=120)  # fmt: skip
    return proc.stdout + proc.stderr


def test_a_full_spool_answers_0xa700_reports_not_ready_and_recovers_by_itself(tmp_path, made_films, models_dir):
    big = tmp_path / "films" / "big.dcm"  # 21 MB of pixels: more than is left on the spool when it arrives
    big.parent.mkdir()
    raw = big.with_suffix(".raw.dcm")
    make_dicom(np.full((3000, 3500), 1000, dtype=np.uint16), raw)
    normalise(raw, big)
    small = made_films[0]

    spool = tmp_path / "spool"
    spool.mkdir()
    gate = Gate.create(tmp_path, spool={"min_free_bytes": RESERVE, "min_free_percent": 0.0}, workers={"processes": 1})
    mount = 'mount -t tmpfs -o size=48m filmgate-test-spool "$0" && exec "$@"'
    gate.start(prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(spool)])
    assert gate.proc is not None
    view = Path(f"/proc/{gate.proc.pid}/root") / spool.relative_to("/")  # the spool as the node sees it
    st = os.statvfs(view)
    assert 40 * MIB < st.f_blocks * st.f_frsize <= 48 * MIB, "the node's spool must be the small tmpfs"
    filler = view / "filler"
    try:
        # 1. Space above the reserve, but a dataset larger than what is left: the write fails while it arrives.
        _fill_to(filler, view, 14 * MIB)
        assert send_file_raw(gate.dicom_port, big) == 0xA700
        assert list((view / "tmp").iterdir()) == [], "the partial file is removed at once"
        assert list((view / "incoming").iterdir()) == []
        assert _free(view) > 13 * MIB
        assert gate.http_get("/readyz")[0] == 200, "space is above the reserve again once the partial file is gone"
        assert "No space left on device" in gate.log()

        # 2. Below the reserve: refused before anything is written, readiness false, one clear log line.
        _fill_to(filler, view, 4 * MIB)
        wait_for(lambda: gate.http_get("/readyz")[0] == 503, 10, "/readyz 503 while the spool is below its reserve")
        out = _storescu_status(small.path, gate.dicom_port)  # DCMTK sees the failure status, not an abort
        assert "Received Store Response (Refused: OutOfResources)" in out, out
        assert send_file_raw(gate.dicom_port, small.path) == 0xA700
        assert gate.counter("filmgate_store_failures_total", status="0xA700") == 3
        assert gate.metrics()["filmgate_ready"] == 0
        assert 0 < gate.metrics()["filmgate_spool_free_bytes"] <= RESERVE
        full_lines = [line for line in gate.log().splitlines() if "is full:" in line]
        assert len(full_lines) == 1, full_lines
        assert "spool.min_free_bytes" in full_lines[0] and "Free it:" in full_lines[0]
        assert list((view / "tmp").iterdir()) == [] and list((view / "incoming").iterdir()) == []

        # 3. Space freed: recovery needs nobody.
        filler.unlink()
        wait_for(lambda: gate.http_get("/readyz")[0] == 200, 10, "/readyz 200 again once space is freed")
        assert "the spool has space again" in gate.log()
        assert send_file_raw(gate.dicom_port, small.path) == 0
        assert send_file_raw(gate.dicom_port, big) == 0
        gate.wait_delivered(2, timeout=90)
    finally:
        assert gate.stop() == 0
