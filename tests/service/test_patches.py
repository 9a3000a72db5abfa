"""filmgate.patches: every library change in one module, installed once, checked against the installed version."""

from __future__ import annotations

import subprocess
import sys

import pynetdicom
import pytest

from filmgate import patches
from tests.helpers import REPO


def test_the_installed_pynetdicom_is_one_the_patches_were_tested_with():
    assert patches.problems() == [], "run the node's tests against this pynetdicom, then widen TESTED_PYNETDICOM"
    lo, hi = patches.TESTED_PYNETDICOM
    assert lo <= patches._version(pynetdicom.__version__) < hi


def test_install_is_idempotent_and_patches_every_named_attribute():
    import pynetdicom.dimse_messages as dimse_messages
    from pynetdicom import _config
    from pynetdicom.dul import DULServiceProvider
    from pynetdicom.transport import AssociationSocket

    patches.install()
    patches.install()
    assert patches.installed()
    assert _config.STORE_SEND_CHUNKED_DATASET is True
    assert _config.STORE_RECV_CHUNKED_DATASET is False, "only the listener turns chunked receive on"
    assert dimse_messages.NamedTemporaryFile is patches._receive_file
    assert AssociationSocket.recv is patches._bounded_recv
    dul = DULServiceProvider(None)  # type: ignore[arg-type]
    assert hasattr(dul, "_run_loop_delay"), "tune_reactor sets this per association"
    # Every patched attribute named in PATCHED exists (problems() looks each one up).
    assert DULServiceProvider._read_pdu_data.__module__ == "filmgate.patches"
    assert {m for m, _ in patches.PATCHED} == {
        "pynetdicom._config", "pynetdicom.dimse_messages", "pynetdicom.transport", "pynetdicom.dul",
        "pynetdicom.association", "pynetdicom.dimse", "pynetdicom.pdu", "pynetdicom._handlers",
    }  # fmt: skip


def test_chunked_receive_is_turned_on_by_the_listener_only_and_can_be_turned_off(tmp_path):
    from pynetdicom import _config

    made = []

    def factory(suffix: str = ".dcm"):
        made.append(suffix)
        return open(tmp_path / f"x{suffix}", "wb")

    patches.install()
    try:
        patches.receive_datasets_into(factory)
        assert _config.STORE_RECV_CHUNKED_DATASET is True
        import pynetdicom.dimse_messages as dimse_messages

        dimse_messages.NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm").close()
        assert made == [".dcm"]
    finally:
        patches.receive_datasets_into(None)
    assert _config.STORE_RECV_CHUNKED_DATASET is False


def test_the_event_driven_reactors_are_installed_once():
    import pynetdicom.association as association
    import pynetdicom.dul as dul

    patches.make_reactors_event_driven()
    send_pdu = dul.DULServiceProvider.send_pdu
    patches.make_reactors_event_driven()
    assert dul.DULServiceProvider.send_pdu is send_pdu, "idempotent: not wrapped twice"
    assert dul.time.sleep is not association.time.sleep
    assert dul.time.monotonic is __import__("time").monotonic  # the rest of the time module unchanged


def test_an_untested_pynetdicom_is_refused_with_its_version(monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "3.9.0")
    found = patches.problems()
    assert len(found) == 1 and "pynetdicom 3.9.0 is installed" in found[0] and ">=3.0.0,<3.1.0" in found[0]
    monkeypatch.setattr(patches, "_installed", False)
    with pytest.raises(patches.PatchError, match=r"pynetdicom 3\.9\.0 .*pip install 'pynetdicom>=3\.0\.0,<3\.1\.0'"):
        patches.install()


def test_a_missing_patch_target_is_named(monkeypatch):
    import pynetdicom.dimse_messages as dimse_messages

    monkeypatch.delattr(dimse_messages, "NamedTemporaryFile")
    found = patches.problems()
    assert any("pynetdicom.dimse_messages.NamedTemporaryFile" in p for p in found), found


def test_no_library_internals_are_touched_outside_filmgate_patches():
    """The rule the module exists for: nothing else in the service assigns pynetdicom internals."""
    pattern = (
        r"_config\.\w+ *=|NamedTemporaryFile *=|AssociationSocket\.recv *=|_run_loop_delay *=|copyreg|"
        r"(dul|association)\.time *=|\.send_pdu *=|\.kill_dul *=|require_calling_aet"
    )
    out = subprocess.run(
        ["grep", "-rnE", pattern, "service/", "--include=*.py"], cwd=REPO, capture_output=True, text=True
    ).stdout
    offenders = [line for line in out.splitlines() if not line.startswith("service/patches.py:")]
    assert offenders == []


def test_the_cli_refuses_to_start_on_an_untested_pynetdicom(tmp_path):
    """The entry point checks at start, before anything listens (a site that upgraded pynetdicom finds out at once)."""
    code = (
        "import pynetdicom, sys; pynetdicom.__version__ = '4.0.0'; from filmgate.cli import main; "
        "sys.exit(main(['check-config', sys.argv[1]]))"
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "pynetdicom 4.0.0 is installed" in proc.stderr and "pynetdicom>=3.0.0,<3.1.0" in proc.stderr


# A sender whose Association reactor is caught in pynetdicom's pause race: the reactor's checkpoint wait returns, the
# sender clears the checkpoint and (seeing _is_paused) sends; the reactor goes on, after the peer's answer is queued,
# into one more get_msg before the sender reads it. The interleaving is forced, not left to chance: the reactor's
# checkpoint wait returns only once the answer is queued, and the sender reads only after the reactor's pass.
RACE = r"""
import sys, threading, time
from pynetdicom import AE
from pynetdicom.sop_class import Verification
if sys.argv[2] == "patched":
    from filmgate import patches
    patches.install()

ae = AE(ae_title="RACESCU")
ae.add_requested_context(Verification)
ae.dimse_timeout = 3
assoc = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="STORESCP")
assert assoc.is_established
armed, in_window, reactor_took = threading.Event(), threading.Event(), threading.Event()

class LateCheckpoint(threading.Event):
    def wait(self, timeout=None):
        passed = super().wait(timeout)
        if threading.current_thread() is assoc and armed.is_set():
            armed.clear()  # once: _is_paused is True here; go on only when the peer's answer waits in the queue
            in_window.set()
            deadline = time.monotonic() + 5
            while not assoc.dimse.msg_queue.qsize() and time.monotonic() < deadline:
                time.sleep(0.001)
        return passed

checkpoint = LateCheckpoint()
checkpoint.set()
assoc._reactor_checkpoint = checkpoint
real_get = assoc.dimse.get_msg

def get_msg(block=False):
    if threading.current_thread() is assoc:  # the reactor's pass
        item = real_get(block)
        if item[1] is not None:
            reactor_took.set()
        return item
    reactor_took.wait(5)  # the sender reads after the reactor's pass
    return real_get(block)

assoc.dimse.get_msg = get_msg
armed.set()
assert in_window.wait(5), "the reactor never reached its checkpoint"
status = assoc.send_c_echo()
print("took" if reactor_took.is_set() else "not-taken", int(status.Status) if "Status" in status else "none")
assoc.release() if assoc.is_established else None
"""


def test_a_response_the_reactor_takes_by_the_pause_race_reaches_the_waiting_sender(tmp_path):
    """pynetdicom's requestor race (see filmgate.patches): unpatched, the answer is lost and the sender waits its DIMSE
    timeout (what left C-STOREs unanswered in the fault harness); with the patches, it gets the answer."""
    from tests.helpers import DCMTK_ENV, Process, free_port, wait_for

    port = free_port()
    peer = Process(["/usr/bin/storescp", "--ignore", "--aetitle", "STORESCP", str(port)], tmp_path / "scp.log",
                   env=DCMTK_ENV)  # fmt: skip
    try:
        echo = ["/usr/bin/echoscu", "-aec", "STORESCP", "127.0.0.1", str(port)]
        wait_for(lambda: subprocess.run(echo, capture_output=True, env=DCMTK_ENV).returncode == 0, 20, "storescp")
        results = {}
        for mode in ("unpatched", "patched"):
            proc = subprocess.run([sys.executable, "-c", RACE, str(port), mode], capture_output=True, text=True,
                                  timeout=60, cwd=REPO)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            results[mode] = proc.stdout.split()
        assert results["unpatched"] == ["took", "none"], "the race was not reproduced: " + str(results)
        assert results["patched"] == ["took", "0"], results
    finally:
        peer.stop()


def _scp(port: int, handlers: list) -> object:
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

    ae = AE(ae_title="PATCHSCP")
    ae.maximum_pdu_size = 16384  # a 512 x 512 film arrives in about 32 P-DATA-TF PDUs
    ae.add_supported_context(DigitalXRayImageStorageForPresentation)
    ae.add_supported_context(Verification)
    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)


@pytest.mark.parametrize("data_handler", [False, True], ids=["views", "with-EVT_DATA_RECV"])
def test_data_pdus_read_without_copies_reach_the_handler_byte_for_byte(tmp_path, data_handler):
    """The P-DATA-TF read path (filmgate.patches._read_data_pdus_without_copies), against DCMTK storescu: every pixel
    arrives as sent, and a handler bound to EVT_DATA_RECV still gets each PDU as bytes (pynetdicom's path)."""
    from pynetdicom import evt

    from tests import hostile
    from tests.helpers import DCMTK_ENV, free_port

    patches.install()
    film = hostile.small_dataset(512, 512, seed=3)
    path = hostile.save(film, tmp_path / "film.dcm")
    got: dict = {"pixels": None, "data": []}

    def on_store(event):
        got["pixels"] = event.dataset.PixelData
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store)]
    if data_handler:
        handlers.append((evt.EVT_DATA_RECV, lambda event: got["data"].append(event.data)))
    port = free_port()
    server = _scp(port, handlers)
    try:
        proc = subprocess.run(["/usr/bin/storescu", "-aec", "PATCHSCP", "127.0.0.1", str(port), str(path)],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown()  # type: ignore[attr-defined]
    assert got["pixels"] == film.PixelData
    if data_handler:
        assert len(got["data"]) > 30 and all(type(d) is bytes for d in got["data"])
        assert sum(len(d) for d in got["data"]) > len(film.PixelData)
    else:
        assert got["data"] == []


@pytest.mark.parametrize("item", [b"\x00\x00\x00\x00", b"\x00\x00\x10\x00\x01\x02", b"\x00\x00"],
                         ids=["empty-item", "item-longer-than-pdu", "cut-short"])  # fmt: skip
def test_a_malformed_data_pdu_ends_its_association_and_the_node_goes_on(item):
    """A P-DATA-TF whose presentation data value item is empty, longer than its PDU, or cut short is an invalid PDU
    (the association is aborted, as pynetdicom does); the next association is served."""
    import struct

    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from tests.helpers import free_port, wait_for

    patches.install()
    port = free_port()
    server = _scp(port, [(evt.EVT_C_STORE, lambda event: 0x0000)])
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="PATCHSCP")
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, len(item)) + item)
        wait_for(lambda: assoc.is_aborted or not assoc.is_alive(), 10, "the node ending the association")
        again = ae.associate("127.0.0.1", port, ae_title="PATCHSCP")
        assert again.is_established and again.send_c_echo().Status == 0x0000
        again.release()
    finally:
        server.shutdown()  # type: ignore[attr-defined]


def _send_chunked(tmp_path, films: list, handlers: list, monkeypatch) -> dict:
    """Send ``films`` with DCMTK storescu in one association to an SCP that writes datasets to files as they arrive
    (the listener's chunked receive); count the P-DATA-TF PDUs the fast path was offered and the ones it wrote."""
    import tempfile

    import pydicom
    from pynetdicom import evt

    from tests import hostile
    from tests.helpers import DCMTK_ENV, free_port

    seen = {"offered": 0, "written": 0, "pixels": []}
    offer = patches._write_dataset_fragments

    def counted(*args):
        wrote = offer(*args)
        seen["offered"] += 1
        seen["written"] += wrote
        return wrote

    def on_store(event):
        seen["pixels"].append(pydicom.dcmread(event.dataset_path).PixelData)
        return 0x0000

    patches.install()
    monkeypatch.setattr(patches, "_write_dataset_fragments", counted)
    paths = [str(hostile.save(film, tmp_path / f"film{i}.dcm")) for i, film in enumerate(films)]
    port = free_port()

    def spool_file(suffix: str = ".dcm"):
        return tempfile.NamedTemporaryFile(dir=tmp_path, suffix=suffix, delete=False)  # noqa: SIM115 - the SCP closes it

    patches.receive_datasets_into(spool_file)
    server = _scp(port, [(evt.EVT_C_STORE, on_store), *handlers])
    try:
        proc = subprocess.run(["/usr/bin/storescu", "-aec", "PATCHSCP", "127.0.0.1", str(port), *paths],
                              capture_output=True, text=True, env=DCMTK_ENV, timeout=60)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    finally:
        server.shutdown()  # type: ignore[attr-defined]
        patches.receive_datasets_into(None)
    return seen


def test_dataset_fragments_written_straight_to_the_file_arrive_byte_for_byte(tmp_path, monkeypatch):
    """The fast path of the P-DATA-TF read (``_write_dataset_fragments``) takes the middle fragments of each film, not
    its command set or last fragment, and two films in one association arrive exactly as sent."""
    from tests import hostile

    films = [hostile.small_dataset(512, 512, seed=3), hostile.small_dataset(640, 480, seed=4)]
    seen = _send_chunked(tmp_path, films, [], monkeypatch)
    assert seen["pixels"] == [film.PixelData for film in films]
    # 16 KiB PDUs: a 512 x 512 film is about 32 of them, all but the command and the last carry middle fragments.
    assert seen["written"] > 50, seen
    assert seen["offered"] - seen["written"] >= 4, "the command sets and the last fragments go pynetdicom's way"


@pytest.mark.parametrize("watcher", ["EVT_FSM_TRANSITION", "EVT_PDU_RECV"])
def test_a_handler_watching_pdus_or_transitions_still_sees_every_data_pdu(tmp_path, monkeypatch, watcher):
    """A handler bound to EVT_FSM_TRANSITION gets a DT-2 for every P-DATA-TF, and one bound to EVT_PDU_RECV every
    P-DATA-TF: with one bound, the fast path writes nothing itself."""
    from pynetdicom import evt
    from pynetdicom.pdu import P_DATA_TF

    from tests import hostile

    events: list = []
    if watcher == "EVT_FSM_TRANSITION":
        handler = (evt.EVT_FSM_TRANSITION, lambda event: events.append(event.action == "DT-2" or None))
    else:
        handler = (evt.EVT_PDU_RECV, lambda event: events.append(isinstance(event.pdu, P_DATA_TF) or None))
    film = hostile.small_dataset(512, 512, seed=5)
    seen = _send_chunked(tmp_path, [film], [handler], monkeypatch)
    assert seen["pixels"] == [film.PixelData]
    assert seen["written"] == 0 and seen["offered"] > 25, seen
    assert events.count(True) == seen["offered"], "one DT-2 or P-DATA-TF event per data PDU"


@pytest.mark.parametrize("hang_up", ["probe", "length-bomb", "garbage"])
def test_a_connection_that_closes_before_associating_ends_its_thread_at_once(hang_up):
    """A port scan, a load-balancer probe, a PDU refused for its length, garbage: the connection is gone before any
    A-ASSOCIATE-RQ, yet pynetdicom's acceptor thread waits out its ACSE timeout for one (the control, without the
    handler), holding a connection slot and a stopping node. With ``end_unassociated`` in the EVT_CONN_CLOSE handler
    it ends at once; an association that did associate is left to pynetdicom."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from tests import hostile
    from tests.helpers import free_port, wait_for

    patches.install()
    told: list[bool] = []
    for with_handler in (False, True):
        ae = AE(ae_title="PATCHSCP")
        ae.acse_timeout = 30  # far longer than any wait below
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_CONN_CLOSE, lambda event: told.append(patches.end_unassociated(event.assoc)))]
        port = free_port()
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers if with_handler else [])
        try:
            hostile.hang_up(port, hostile.HANG_UPS[hang_up])
            if with_handler:
                wait_for(lambda: not server.active_associations, 10, "the acceptor thread ended")  # noqa: B023
                assert told == [True]
                requestor = AE(ae_title="ECHOSCU")
                requestor.add_requested_context(Verification)
                assoc = requestor.associate("127.0.0.1", port, ae_title="PATCHSCP")
                assert assoc.is_established and assoc.send_c_echo().Status == 0
                assoc.release()
                wait_for(lambda: len(told) == 2, 10, "the echo association's close")
                assert told == [True, False], "an association that associated is pynetdicom's to end"
            else:
                (acceptor,) = server.active_associations
                wait_for(lambda: not acceptor.dul.is_alive(), 10, "the connection closed")  # noqa: B023
                assert acceptor.is_alive(), "pynetdicom waits for an A-ASSOCIATE that cannot come"
        finally:
            server.shutdown()


def test_the_acceptors_wait_for_its_request_is_checked(monkeypatch):
    monkeypatch.setattr(patches, "_ACCEPTOR_WAIT", ("primitive = self.dul.wait_for_request()",))
    found = patches.problems()
    assert any("end_unassociated" in p for p in found), found
