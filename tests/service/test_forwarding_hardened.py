"""Forwarding without head-of-line blocking (issue 9, item 5), against real pynetdicom receivers that refuse, accept
only some transfer syntaxes, speak only TLS, and go down and come back: each instance waits for its own back-off
while the others go on; permanent refusals are dead letters at once with their reason; `filmgate resend` queues dead
letters again; the bytes forwarded are the bytes received unless the destination is told to decompress."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from filmgate.config import DicomDestinationConfig, TLSConfig, parse_config
from filmgate.destinations import Delivery, DicomDestination
from filmgate.spool import Spool
from tests import hostile
from tests.helpers import REPO, Receiver, dataset_bytes, free_port, sha, wait_for

EXPLICIT = "1.2.840.10008.1.2.1"


def films(folder: Path, n: int, *, rle: bool = False) -> list[tuple[str, Path]]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds = hostile.rle_film(seed=i) if rle else hostile.small_dataset(seed=i)
        out.append((str(ds.SOPInstanceUID), hostile.save(ds, folder / f"{folder.name}-{i:03d}.dcm")))
    return out


def destination(tmp_path: Path, port: int, **kw) -> DicomDestination:
    settings = {"retries": 5, "backoff_initial": 0.2, "backoff_factor": 2.0, "backoff_max": 30.0, "timeout": 5, **kw}
    cfg = DicomDestinationConfig(name="pacs", ae_title="PACS", host="127.0.0.1", port=port, **settings)
    return DicomDestination(cfg, Spool(tmp_path / "spool", fsync=False))


def queue(dest: DicomDestination, items: list[tuple[str, Path]]) -> None:
    for _uid, path in items:
        dest.deliver(Delivery(path=path, fields={}))


def dead_notes(dest: DicomDestination) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in dest.dead.glob("*.json")}


def test_one_failing_instance_waits_alone_while_the_others_go_on(tmp_path):
    items = films(tmp_path / "films", 6)
    slow_uid = items[0][0]
    # The first instance is refused with a temporary failure (0xA700, out of resources) three times.
    pacs = Receiver(free_port(), answers={slow_uid: [0xA700, 0xA700, 0xA700]})
    pacs.start()
    dest = destination(tmp_path, pacs.port, backoff_initial=0.6, backoff_factor=2.0)
    try:
        queue(dest, items)
        dest.start()
        others = {u for u, _ in items[1:]}
        wait_for(lambda: others <= set(pacs.uids()), 30, "the other instances forwarded")
        assert slow_uid not in pacs.uids(), "the failing instance is still in its back-off"
        assert len(pacs.refused) < 3, "the others did not wait for its whole back-off"
        wait_for(lambda: slow_uid in pacs.uids(), 60, "the failing instance forwarded after its retries")
        assert [s for _, s in pacs.refused] == [0xA700] * 3
        expected = {u: sha(dataset_bytes(p.read_bytes())) for u, p in items}
        assert dict(pacs.received) == expected, "each once, the bytes received"
        wait_for(lambda: not dest.pending() and not list(dest.outbox.glob("*.json")), 10, "an empty outbox")
    finally:
        dest.stop(10)
        pacs.stop()


@pytest.mark.parametrize("status", [0x0122, 0xA900, 0xA9FF])
def test_a_permanent_refusal_is_a_dead_letter_at_once(tmp_path, status):
    items = films(tmp_path / "films", 3)
    bad = items[1][0]
    pacs = Receiver(free_port(), answers={bad: [status] * 10})
    pacs.start()
    dest = destination(tmp_path, pacs.port, retries=8)
    try:
        queue(dest, items)
        dest.start()
        wait_for(lambda: len(list(dest.dead.glob("*.dcm"))) == 1, 30, "the refused instance dead-lettered")
        wait_for(lambda: len(pacs.uids()) == 2, 30, "the others forwarded")
        assert pacs.refused == [(bad, status)], "one attempt, no retries"
        (note,) = dead_notes(dest).values()
        assert note["permanent"] is True and note["attempts"] == 1 and f"0x{status:04X}" in note["error"]
    finally:
        dest.stop(10)
        pacs.stop()


def test_no_accepted_presentation_context_is_permanent_unless_transcoding_is_allowed(tmp_path):
    rle = films(tmp_path / "rle", 2, rle=True)
    plain = films(tmp_path / "plain", 1)
    pacs = Receiver(free_port(), syntaxes=[EXPLICIT])  # takes only Explicit VR Little Endian
    pacs.start()
    strict = destination(tmp_path / "strict", pacs.port)
    try:
        queue(strict, rle + plain)
        strict.start()
        wait_for(lambda: len(list(strict.dead.glob("*.dcm"))) == 2, 30, "RLE instances dead-lettered")
        wait_for(lambda: plain[0][0] in pacs.uids(), 30, "the uncompressed one forwarded")
        notes = dead_notes(strict)
        assert all(n["permanent"] and "no presentation context" in n["error"] for n in notes.values())
        assert all(n["attempts"] == 1 for n in notes.values())
    finally:
        strict.stop(10)
    converting = destination(tmp_path / "converting", pacs.port, transcode_to=(EXPLICIT,))
    try:
        queue(converting, rle)
        converting.start()
        wait_for(lambda: {u for u, _ in rle} <= set(pacs.uids()), 30, "RLE instances decompressed and forwarded")
        for uid, path in rle:
            assert pacs.syntax[uid] == EXPLICIT
            got = pacs.datasets[uid]
            got.file_meta = pydicom.dataset.FileMetaDataset()
            got.file_meta.TransferSyntaxUID = EXPLICIT
            assert np.array_equal(got.pixel_array, pydicom.dcmread(path).pixel_array), "lossless"
        assert not list(converting.dead.glob("*.dcm"))
    finally:
        converting.stop(10)
        pacs.stop()


def test_a_peer_back_from_an_outage_gets_every_waiting_instance_at_once(tmp_path):
    items = films(tmp_path / "films", 5)
    pacs = Receiver(free_port())  # down at first
    # Long per-instance back-off: without the probe, the instances would wait up to a minute after the outage.
    dest = destination(tmp_path, pacs.port, retries=20, backoff_initial=0.3, backoff_factor=4.0, backoff_max=60.0)
    try:
        queue(dest, items)
        dest.start()

        def attempts() -> int:
            return sum(json.loads(p.read_text())["attempts"] for p in dest.outbox.glob("*.retry.json"))

        wait_for(lambda: attempts() >= 12, 60, "repeated failed attempts while the peer is down")
        waits = [json.loads(p.read_text())["attempts"] for p in dest.outbox.glob("*.retry.json")]
        assert max(waits) >= 3, "some instance is deep in its back-off (>= 4.8 s)"
        pacs.start()
        back = time.monotonic()
        wait_for(lambda: {u for u, _ in items} <= set(pacs.uids()), 30, "every instance after the peer came back")
        assert time.monotonic() - back < 4.0, "due at once when the peer answers, not after their own back-off"
        assert sorted(pacs.uids()) == sorted(u for u, _ in items)
    finally:
        dest.stop(10)
        pacs.stop()


def _cert(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_forwarding_over_mutual_tls(tmp_path):
    server_cert, server_key = _cert(tmp_path, "pacs")
    client_cert, client_key = _cert(tmp_path, "filmgate")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(client_cert))
    ctx.load_cert_chain(server_cert, server_key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    pacs = Receiver(free_port(), ssl_context=ctx)
    pacs.start()
    items = films(tmp_path / "films", 2)
    tls = TLSConfig(enabled=True, ca_file=str(server_cert), cert_file=str(client_cert), key_file=str(client_key))
    dest = destination(tmp_path / "ok", pacs.port, tls=tls)
    # Without our client certificate the peer refuses: never delivered, retried, not lost.
    anonymous = destination(tmp_path / "anon", pacs.port, tls=TLSConfig(enabled=True, ca_file=str(server_cert)),
                            retries=1, backoff_initial=0.1)  # fmt: skip
    try:
        queue(dest, items)
        dest.start()
        wait_for(lambda: {u for u, _ in items} <= set(pacs.uids()), 30, "forwarded over TLS")
        queue(anonymous, films(tmp_path / "more", 1))
        anonymous.start()
        wait_for(lambda: len(list(anonymous.dead.glob("*.dcm"))) == 1, 30, "refused without a client certificate")
        assert len(pacs.uids()) == 2
    finally:
        dest.stop(10)
        anonymous.stop(10)
        pacs.stop()


def test_tls_settings_are_checked(tmp_path):
    base = {"type": "dicom", "ae_title": "PACS", "host": "h", "port": 104}
    for tls, key in [({"enabled": True, "require_client_cert": True}, "tls.require_client_cert"),
                     ({"enabled": True, "cert_file": str(tmp_path / "none.crt"), "key_file": "k"}, "tls.cert_file"),
                     ({"enabled": True, "cert_file": "c"}, "tls")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"destinations.pacs.{key}"):
            parse_config({"destinations": {"pacs": {**base, "tls": tls}, "q": {"type": "folder", "path": "q"}},
                          "routes": {"accept": ["pacs"], "quarantine": ["q"]}})  # fmt: skip
    with pytest.raises(ValueError, match=r"destinations.pacs.transcode_to\[0\]"):
        parse_config({"destinations": {"pacs": {**base, "transcode_to": ["1.2.840.10008.1.2.4.50"]},
                                       "q": {"type": "folder", "path": "q"}},
                      "routes": {"accept": ["pacs"], "quarantine": ["q"]}})  # fmt: skip


def test_resend_puts_dead_letters_back_and_the_running_forwarder_delivers_them(tmp_path):
    items = films(tmp_path / "films", 4)
    port = free_port()
    cfg_path = tmp_path / "filmgate.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "spool": {"path": str(tmp_path / "spool"), "fsync": False},
        "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": port,
                                  "retries": 0, "backoff_initial": 0.1, "timeout": 5},
                         "hold": {"type": "folder", "path": str(tmp_path / "hold")}},
        "routes": {"accept": ["pacs"], "quarantine": ["hold"]},
    }))  # fmt: skip
    dest = destination(tmp_path, port, retries=0)
    try:
        queue(dest, items)
        dest.start()  # nobody listens: every instance dead-lettered after its one attempt
        wait_for(lambda: len(list(dest.dead.glob("*.dcm"))) == 4, 30, "dead letters")
        pacs = Receiver(port)
        pacs.start()

        def resend(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "filmgate.cli", "resend", "--config", str(cfg_path), *args],
                                  cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip

        one = sorted(dest.dead.glob("*.dcm"))[0]
        run = resend(str(one))  # one file
        assert run.returncode == 0 and "1 instance(s) queued again for pacs" in run.stdout, run.stderr
        wait_for(lambda: len(pacs.uids()) == 1, 30, "the resent file forwarded")
        run = resend(str(dest.dead))  # the whole folder
        assert run.returncode == 0 and "3 instance(s) queued again for pacs" in run.stdout, run.stderr
        wait_for(lambda: len(pacs.uids()) == 4, 30, "the resent folder forwarded")
        assert dict(pacs.received) == {u: sha(dataset_bytes(p.read_bytes())) for u, p in items}
        assert not list(dest.dead.iterdir()), "dead letters and their notes are gone"
        stray = tmp_path / "stray.dcm"
        stray.write_bytes(items[0][1].read_bytes())
        run = resend(str(stray))  # no note, no --to: refused, nothing moved
        assert run.returncode == 2 and "--to" in run.stderr and stray.exists()
        pacs.stop()
    finally:
        dest.stop(10)
