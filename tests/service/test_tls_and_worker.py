"""Optional DICOM TLS on the listener, and the supervision of the worker process."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path

from tests.helpers import DX_FOR_PRESENTATION, REPO, Gate, self_signed, send_file_raw, wait_for


def test_tls_listener(tmp_path, made_films, models_dir):
    cert, key = self_signed(tmp_path)
    gate = Gate.create(
        tmp_path,
        listener={"tls": {"enabled": True, "cert_file": str(cert), "key_file": str(key)}},
        workers={"processes": 0},  # also covers the single-process mode (workers as threads)
    ).start()
    try:
        from pynetdicom import AE
        from pynetdicom.sop_class import Verification

        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ctx.check_hostname = False
        ae = AE(ae_title="TLSSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", tls_args=(ctx, None))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        # A film over TLS is stored and judged; without TLS the node does not talk.
        store = AE(ae_title="TLSSCU")
        store.add_requested_context(DX_FOR_PRESENTATION, ["1.2.840.10008.1.2.1"])
        assoc = store.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", tls_args=(ctx, None))
        assert assoc.is_established
        assert assoc.send_c_store(made_films[0].path).Status == 0
        assoc.release()
        wait_for(lambda: len(gate.sidecars()) == 1, 60, "the film sent over TLS delivered")
        assert send_file_raw(gate.dicom_port, made_films[0].path) is None
        hc = subprocess.run(
            [sys.executable, "-m", "filmgate.cli", "healthcheck", "--config", str(gate.config_path)],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert hc.returncode == 0, hc.stdout + hc.stderr
    finally:
        assert gate.stop() == 0


def test_a_dead_worker_process_is_restarted(tmp_path, made_films, models_dir):
    gate = Gate.create(tmp_path).start()
    try:
        assert gate.proc is not None
        children = Path(f"/proc/{gate.proc.pid}/task/{gate.proc.pid}/children").read_text().split()
        workers = [c for c in children if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 2, "two worker processes by default"
        os.kill(int(workers[0]), signal.SIGKILL)
        wait_for(lambda: "died (exit code -9); restarting" in gate.log(), 30, "the node to notice")
        assert send_file_raw(gate.dicom_port, made_films[0].path) == 0
        wait_for(lambda: len(gate.sidecars()) == 1, 60, "delivery by the restarted worker")
    finally:
        assert gate.stop() == 0
