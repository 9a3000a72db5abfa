"""The network side under hostile and unlucky peers, through real sockets against the real node (issue 9, items 1, 4
and 7): PDU-length bombs, silent and dripping connections, connection and association floods, the health-check AE
title, the called AE title, the allow-list, and where the HTTP server listens.

One node serves the whole module (thread mode: the listener is what is under test). Attackers come from other
loopback addresses (127.0.0.2, 127.0.0.3, ...) so that the per-host limits can be told apart from the legitimate
sender on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.helpers import DCMTK_ENV, DX_FOR_PRESENTATION, Gate, send_file_raw, storescu, wait_for

ACSE_TIMEOUT = 4.0
A_ABORT = 0x07


@pytest.fixture(scope="module")
def gate(tmp_path_factory, models_dir):
    root = tmp_path_factory.mktemp("net")
    g = Gate.create(
        root,
        listener={
            "acse_timeout": ACSE_TIMEOUT,
            "max_associations": 12,
            "max_associations_per_host": 4,
            "max_connections": 160,
            "max_connections_per_host": 40,
            "allow": [{"ae_title": "*", "hosts": ["127.0.0.1", "127.0.0.2", "127.0.0.3", "::1"]}],
        },
        workers={"processes": 0},
    )
    del g.config["http"]["host"]  # the default must be loopback
    g.config_path.write_text(__import__("yaml").safe_dump(g.config))
    g.start()
    yield g
    assert g.stop() == 0


def _echo(port: int, aet: str = "ECHOSCU", aec: str = "FILMGATE") -> bool:
    proc = subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)  # fmt: skip
    return proc.returncode == 0


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    return s


def _read_all(s: socket.socket, timeout: float) -> bytes:
    """What the node sends until it closes the connection (fails if it does not within ``timeout``)."""
    s.settimeout(timeout)
    out = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return out
        out += chunk


def test_a_pdu_length_bomb_costs_nothing_and_the_node_keeps_serving(gate):
    """16 bytes declaring a 4 GiB A-ASSOCIATE-RQ: answered with A-ABORT before anything is read or allocated."""
    before = gate.memory_kib()
    for _ in range(20):  # bounded: twenty bombs, each would be 4 GiB if allocated
        with _connect(gate.dicom_port) as s:
            s.sendall(b"\x01\x00" + struct.pack(">L", 0xFFFFFFFF) + b"\x00\x01\x00\x00FILMGATE")
            reply = _read_all(s, 15)
        assert reply[:1] == bytes([A_ABORT]) and len(reply) == 10, reply
    after = gate.memory_kib()
    assert after["VmHWM"] - before["VmHWM"] < 64 * 1024, (before, after)  # peak resident set: not 4 GiB, not 1
    assert gate.counter("filmgate_refusals_total", reason="pdu-too-large") == 20
    assert "refused a PDU declaring 4294967295 bytes" in gate.log()
    assert _echo(gate.dicom_port)


def test_declared_lengths_within_the_limit_allocate_only_what_arrives(gate):
    """30 connections each declaring a 4 MiB A-ASSOCIATE-RQ (within the limit) and sending 100 bytes of it: the node
    reads what arrives into buffers of at most 256 KiB, not 30 x 4 MiB by the declared lengths, and closes them at
    the ACSE timeout."""
    before = gate.memory_kib()
    conns = [_connect(gate.dicom_port) for _ in range(30)]
    try:
        for s in conns:
            s.sendall(b"\x01\x00" + struct.pack(">L", 4 * 1024 * 1024 - 1024) + b"\x00" * 100)
        for s in conns:  # every read has been tried and given up once the node closes the connection
            assert _read_all(s, ACSE_TIMEOUT + 10) == b""
    finally:
        for s in conns:
            s.close()
    after = gate.memory_kib()
    assert after["VmHWM"] - before["VmHWM"] < 40 * 1024, (before, after)  # 30 x 4 MiB would be 120 MiB
    assert _echo(gate.dicom_port)


def test_a_p_data_bomb_inside_an_association_aborts_only_that_association(gate, made_films):
    ae = AE(ae_title="BOMBER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
    assert assoc.is_established
    assoc.dul.socket.socket.sendall(b"\x04\x00" + struct.pack(">L", 0x7FFFFFF0) + b"\x00" * 64)
    wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 15, "the bombing association aborted")
    assert storescu([made_films[0].path], gate.dicom_port) == []  # others still store


def test_silent_and_dripping_connections_are_closed_after_the_acse_timeout(gate):
    t0 = time.monotonic()
    silent = _connect(gate.dicom_port)
    dripping = _connect(gate.dicom_port)
    header = b"\x01\x00" + struct.pack(">L", 200)

    def drip() -> None:
        for byte in header + b"\x00" * 200:  # one byte every 0.3 s: never silent, never done in time
            try:
                dripping.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)  # the attacker's pace, not synchronisation

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        assert _read_all(silent, ACSE_TIMEOUT + 10) == b""
        assert time.monotonic() - t0 < ACSE_TIMEOUT + 5
        _read_all(dripping, ACSE_TIMEOUT + 10)
        assert time.monotonic() - t0 < ACSE_TIMEOUT + 5, "a dripping A-ASSOCIATE-RQ must not outlive the ACSE timeout"
    finally:
        silent.close()
        dripping.close()
        dripper.join(5)
    assert _echo(gate.dicom_port)


def test_idle_connections_and_an_association_flood_do_not_lock_out_senders(gate, made_films):
    """100 idle connections (a port scan, a TCP load-balancer probe) and 200 association attempts from other hosts,
    while a legitimate sender stores: it gets every film through."""
    refused_before = {r: gate.counter("filmgate_refusals_total", reason=r)
                      for r in ("host-connection-limit", "host-association-limit")}  # fmt: skip
    # Bounded: 100 connections that never send a byte; the node closes those over the per-host limit at once.
    idle = [_connect(gate.dicom_port, "127.0.0.2") for _ in range(100)]
    outcomes: list[str] = []
    held = []
    lock = threading.Lock()

    def flood(n: int) -> None:
        ae = AE(ae_title="FLOOD")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = 20
        for _ in range(n):
            assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", bind_address=("127.0.0.3", 0))
            with lock:
                outcomes.append("established" if assoc.is_established else "rejected" if assoc.is_rejected else "other")
                if assoc.is_established:
                    held.append(assoc)  # keep the slot: the flood holds what it gets

    flooders = [threading.Thread(target=flood, args=(10,)) for _ in range(20)]  # 200 attempts
    for t in flooders:
        t.start()
    try:
        errors = storescu([f.path for f in made_films[:4]], gate.dicom_port, aet="LEGIT")
        assert errors == [], errors
        dcmsend = ["dcmsend", "-aet", "LEGIT2", "-aec", "FILMGATE", "127.0.0.1", str(gate.dicom_port)]
        sent = subprocess.run([*dcmsend, str(made_films[4].path)], capture_output=True, text=True, env=DCMTK_ENV,
                              timeout=60)  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert all(_echo(gate.dicom_port) for _ in range(3))
        for t in flooders:
            t.join(120)
        assert len(outcomes) == 200
        assert outcomes.count("established") <= 4, "per-host association limit (max_associations_per_host)"
        assert outcomes.count("rejected") >= 190, outcomes
    finally:
        for assoc in held:
            assoc.release()
        for s in idle:
            s.close()
    refused = {r: gate.counter("filmgate_refusals_total", reason=r) - v for r, v in refused_before.items()}
    assert refused["host-connection-limit"] >= 60 - 5, refused  # 100 idle, at most 40 from one host at once
    assert refused["host-association-limit"] >= 190, refused
    wait_for(lambda: len(gate.sidecars()) >= 5, 60, "the legitimate senders' films delivered")


def test_connections_that_hang_up_before_associating_free_their_slot_at_once(gate):
    """A load balancer's TCP probes (connect, close) and refused PDUs, as many as one host may hold at once
    (max_connections_per_host 40): each frees its slot when it closes, not at the ACSE timeout (pynetdicom's acceptor
    thread used to wait that long for a request that could no longer come), so the host's next sender is let in."""
    from tests import hostile

    first = time.monotonic()
    for i in range(40):
        hostile.hang_up(gate.dicom_port, hostile.HANG_UPS["probe" if i % 2 else "length-bomb"], "127.0.0.2")
    ae = AE(ae_title="AFTERPROBE")
    ae.add_requested_context(Verification)

    def associates() -> bool:
        assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", bind_address=("127.0.0.2", 0))
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    wait_for(associates, 2.0, "an association from the probed host")
    assert time.monotonic() - first < ACSE_TIMEOUT, "let in before the first probe's ACSE timeout could have passed"


def _pdata(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV (PS3.8 9.3.5)."""
    pdv = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return b"\x04\x00" + struct.pack(">L", len(pdv)) + pdv


def test_a_transfer_cut_off_midway_leaves_no_partial_file(gate):
    """A sender that goes away while its dataset arrives: the partial file under spool/tmp goes when the connection
    closes, not an hour later (spool.stale_tmp_seconds). The C-STORE is sent by hand, so that it stops midway."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom.dsutils import encode

    ae = AE(ae_title="CUTOFF")
    ae.add_requested_context(DX_FOR_PRESENTATION, ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
    assert assoc.is_established
    cx = assoc.accepted_contexts[0].context_id
    cmd = Dataset()
    cmd.AffectedSOPClassUID = DX_FOR_PRESENTATION
    cmd.CommandField = 0x0001  # C-STORE-RQ
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000  # a dataset follows
    cmd.AffectedSOPInstanceUID = generate_uid()
    body = encode(cmd, True, True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    command = encode(group, True, True) + body
    tmp = Path(gate.config["spool"]["path"]) / "tmp"
    sock = assoc.dul.socket.socket
    sock.sendall(_pdata(cx, 0x03, command) + _pdata(cx, 0x00, b"\x00" * 65536))  # command, then a first fragment
    wait_for(lambda: any(p.stat().st_size > 65536 for p in tmp.iterdir()), 15, "the dataset arriving under tmp/")
    assoc.abort()
    wait_for(lambda: not list(tmp.iterdir()), 15, "the partial file removed when the connection closed")
    assert not list((Path(gate.config["spool"]["path"]) / "incoming").iterdir())
    assert "removed 1 partial dataset file(s) of a connection that closed mid-transfer" in gate.log()


def test_the_health_check_ae_title_may_only_echo(gate, made_films):
    assert _echo(gate.dicom_port, aet="FILMGATE-HC")
    before = gate.counter("filmgate_store_failures_total", status="0x0124")
    assert send_file_raw(gate.dicom_port, made_films[0].path, aet="FILMGATE-HC") == 0x0124
    assert gate.counter("filmgate_store_failures_total", status="0x0124") == before + 1
    assert not list((Path(gate.config["spool"]["path"]) / "incoming").iterdir())
    assert not list((Path(gate.config["spool"]["path"]) / "tmp").iterdir())


def test_a_full_node_refuses_new_senders_but_answers_its_health_check(gate):
    """Every association slot taken (12: 4 from each of three hosts): a new sender gets A-ASSOCIATE-RJ (transient,
    local limit exceeded), the health check still gets its C-ECHO (a busy node is not a sick one)."""
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = []
    try:
        for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            for _ in range(4):
                assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", bind_address=(source, 0))
                assert assoc.is_established
                held.append(assoc)
        late = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE")
        assert late.is_rejected
        rj = late.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
        assert not _echo(gate.dicom_port)
        assert _echo(gate.dicom_port, aet="FILMGATE-HC")
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: _echo(gate.dicom_port), 15, "slots free again once the holders released")


def test_the_called_ae_title_is_checked(gate):
    assert not _echo(gate.dicom_port, aec="SOMEONE-ELSE")
    ae = AE(ae_title="CALLER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="SOMEONE-ELSE")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x07)  # called AE title not recognised
    assert gate.counter("filmgate_refusals_total", reason="called-ae") == 2
    assert _echo(gate.dicom_port, aec="FILMGATE")


def test_a_sender_outside_the_allow_list_is_refused_through_the_requested_hook(gate):
    ae = AE(ae_title="STRANGER")
    ae.add_requested_context(DX_FOR_PRESENTATION)
    assoc = ae.associate("127.0.0.1", gate.dicom_port, ae_title="FILMGATE", bind_address=("127.0.0.9", 0))
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)  # calling AE title not recognised
    assert "refused association from AE 'STRANGER' at 127.0.0.9: not in the sender allow-list" in gate.log()


def test_the_http_server_listens_on_loopback_by_default(gate):
    assert "host" not in gate.config["http"]
    listening = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, state = fields[1], fields[3]
        addr, port = local.split(":")
        if state == "0A" and int(port, 16) == gate.http_port:
            listening.append(socket.inet_ntoa(struct.pack("<L", int(addr, 16))))
    assert listening == ["127.0.0.1"]


def test_deployments_open_the_http_server_explicitly():
    """The container, Compose and Kubernetes configs must say 0.0.0.0 themselves (Prometheus scrapes from outside)."""
    import yaml

    from tests.helpers import REPO

    for rel in ("deploy/filmgate/container.yaml", "deploy/filmgate/with-orthanc.yaml"):
        assert yaml.safe_load((REPO / rel).read_text())["http"]["host"] == "0.0.0.0", rel
    cm = yaml.safe_load((REPO / "deploy/k8s/base/configmap.yaml").read_text())
    inner = yaml.safe_load(next(iter(cm["data"].values())))
    assert inner["http"]["host"] == "0.0.0.0"


def test_a_peer_streaming_garbage_cannot_flood_the_log(gate):
    """After an invalid PDU, pynetdicom reads the rest of the stream 6 bytes at a time and logs an ERROR for each
    (about 100 lines per 300 KB, each PDU type its own text); the node lets one line of each kind through per 10 s."""
    import random

    rng = random.Random(7)
    before = len(gate.log().splitlines())
    for _ in range(3):
        with _connect(gate.dicom_port, "127.0.0.3") as s:
            s.sendall(b"\x09\x00\x00\x00\x00\x04abcd" + rng.randbytes(300_000))
            with contextlib.suppress(OSError):  # reset by the node while we were still sending: closed as well
                _read_all(s, 15)
    assert _echo(gate.dicom_port)
    lines = gate.log().splitlines()[before:]
    library = [line for line in lines if " pynetdicom." in line or " filmgate.patches:" in line]
    assert 1 <= len(library) <= 12, "\n".join(library)
    assert any("Unknown PDU type received" in line for line in library), "\n".join(lines)
