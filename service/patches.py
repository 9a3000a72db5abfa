"""Every change filmgate makes to a library's behaviour, in one place, checked against the installed version.

pynetdicom is used through its documented API (event handlers, ``AE.make_server`` with our server class) wherever
it offers one. What it does not offer, and the node needs:

- **Received datasets written to the spool while they arrive** (``_config.STORE_RECV_CHUNKED_DATASET`` and
  ``dimse_messages.NamedTemporaryFile``): no 10 MB buffers in memory, and the file is created by a factory the listener
  registers (:func:`receive_datasets_into`), which checks the spool's free space and turns a full disk into a 0xA700
  answer instead of an abort. Only the node's listener turns this on: other SCPs in a process (``filmgate sweep``'s
  C-GET/C-MOVE receiver, the tests' receivers) read ``event.encoded_dataset()``, which chunked receive empties.
- **Sent datasets streamed from their file** (``_config.STORE_SEND_CHUNKED_DATASET``): forwarded bytes stay exactly
  the received bytes, with no decode and re-encode.
- **Bounded reads** (``transport.AssociationSocket.recv``): pynetdicom reads a PDU by the length its 6-byte header
  declares, whatever that length is. The replacement refuses a declared length above the maximum PDU length this side
  announced (``AE.maximum_pdu_size``; the listener's is ``limits.max_pdu_bytes``) plus :data:`PDU_MARGIN` (at least
  :data:`MIN_PDU_LIMIT`, for association requests) before reading or allocating anything (it sends an A-ABORT and
  ends the association; :func:`on_pdu_refused` is told); an AE that announces 0 (unlimited) is not bounded. It allocates
  only as bytes really arrive (at most :data:`CHUNK` ahead), and honours a per-association deadline
  (:func:`set_read_deadline`: a connection must send its A-ASSOCIATE-RQ within the ACSE timeout, however slowly it
  drips). It also reads straight into one buffer: pynetdicom's 4 KiB pieces cost 37% of the listener's CPU.
- **Reactors that wait for events instead of polling** (:func:`make_reactors_event_driven`: the ``time`` module
  seen by ``pynetdicom.dul`` and ``pynetdicom.association``, ``DULServiceProvider.send_pdu`` and ``kill_dul``, the
  class of the two queues an Association reactor reads): an idle association cost 5.9 % of a core, 0.6 % with it
  (bench/idle_cpu); the listener turns this on for its process.
- **Responses the Association reactor takes by mistake** (``Association._serve_request``): pynetdicom's ``send_*``
  methods pause the reactor (``_reactor_checkpoint.clear()``, then wait for ``_is_paused``) before they send a request
  and read its response. The reactor sets ``_is_paused`` *before* it waits on the checkpoint and clears it only after
  the wait returns, so a sender that clears the checkpoint just after the wait returned sees ``_is_paused`` and goes
  on while the reactor makes one more ``get_msg``. When the peer answers within that one pass (a small dataset, a
  loaded machine), the reactor takes the response, logs "Received unexpected C-STORE service message" and drops it;
  the sender waits its whole DIMSE timeout, then aborts. This is what left about 1 C-STORE in 250-500 unanswered in the
  fault harness under load, and it hits the node's forwarding to DICOM destinations too (pynetdicom#875 shows the same
  symptom for C-FIND). The replacement hands such a response back to the head of the queue, where the waiting
  ``send_*`` reads it, when a ``send_*`` is waiting (the checkpoint is cleared); otherwise it behaves as before.
- **P-DATA-TF PDUs read without copies** (``DULServiceProvider._read_pdu_data``): pynetdicom copies every received
  byte four times on its way to the file (appending the PDU to its header, ``bytes()`` of that for ``EVT_DATA_RECV``,
  the PDU's items field, each item's value) and once more when the DIMSE layer drops the control byte. The replacement
  reads a P-DATA-TF's body into one buffer and hands each presentation data value on as a ``memoryview`` of it, which
  the DIMSE layer slices and writes to the file without copying; ``EVT_DATA_RECV`` still gets its ``bytes`` when a
  handler is bound to it, and ``EVT_PDU_RECV`` is still triggered when a handler other than pynetdicom's standard
  logger (which logs nothing for P-DATA-TF) is bound. Every other PDU goes through pynetdicom's own decoding, and the
  FSM events (Evt10, Evt17, Evt19) and log lines are pynetdicom's. A P-DATA-TF that carries only middle fragments of
  a dataset being written to its file (most of a film's PDUs), in Sta6 with nothing queued and no handler watching
  PDUs or state transitions, is written to that file at once, as DT-2 and ``DIMSEMessage.decode_msg`` would
  (``problems`` checks that they still do), instead of going through the event queue and the state machine.
- **Connections that close before they associate end at once** (:func:`end_unassociated`, from the listener's
  ``EVT_CONN_CLOSE`` handler): pynetdicom's acceptor thread waits out its ACSE timeout for an A-ASSOCIATE that can no
  longer come; it is handed what that wait returns on a timeout (``problems`` checks the wait is still written so).
- **The DUL reactor's idle sleep** (``DULServiceProvider._run_loop_delay``, an attribute set per association, so it is
  set from the ``EVT_CONN_OPEN`` handler with :func:`tune_reactor`): 1 ms per idle loop cost ~30% of the receive rate.

:func:`install` is idempotent and called once at start by every entry point (the CLI, the worker processes); it
refuses (``PatchError``, naming the installed version) a pynetdicom outside :data:`TESTED_PYNETDICOM` or one that lacks
an attribute patched here, rather than run with patches that may no longer mean what they did.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import ssl
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

log = logging.getLogger("filmgate.patches")

# The pynetdicom versions these patches were written against and tested with: [first, last) by (major, minor, patch).
TESTED_PYNETDICOM = ((3, 0, 0), (3, 1, 0))
# Peers that count a PDU's header into its length, or round up, still get through; a bomb does not.
PDU_MARGIN = 64 * 1024
MIN_PDU_LIMIT = 1024 * 1024  # an A-ASSOCIATE-RQ with many contexts or a user identity may exceed a 16 KiB maximum
DEFAULT_MAX_PDU = 4 * 1024 * 1024
CHUNK = 256 * 1024  # the most a read allocates ahead of the bytes that really arrived
RUN_LOOP_DELAY = 0.0001
# A-ABORT PDU: type 7, length 4, source 2 (service provider), reason 6 (invalid PDU parameter value).
A_ABORT_INVALID_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0x02, 0x06])

PATCHED = (
    ("pynetdicom._config", "STORE_RECV_CHUNKED_DATASET"),
    ("pynetdicom._config", "STORE_SEND_CHUNKED_DATASET"),
    ("pynetdicom.dimse_messages", "NamedTemporaryFile"),
    ("pynetdicom.transport", "AssociationSocket.recv"),
    ("pynetdicom.dul", "DULServiceProvider()._run_loop_delay"),
    ("pynetdicom.dul", "time.sleep"),  # make_reactors_event_driven: the reactors' sleeps become waits for events
    ("pynetdicom.association", "time.sleep"),
    ("pynetdicom.dul", "DULServiceProvider.send_pdu"),
    ("pynetdicom.dul", "DULServiceProvider.kill_dul"),
    ("pynetdicom.dimse", "DIMSEServiceProvider().msg_queue._put"),  # its class becomes a waking queue
    ("pynetdicom.association", "Association._serve_request"),  # responses taken by the pause race go back
    ("pynetdicom.dul", "DULServiceProvider().to_user_queue._put"),
    ("pynetdicom.dul", "DULServiceProvider._read_pdu_data"),  # P-DATA-TF bodies handed on as views, not copies
    ("pynetdicom.dul", "DULServiceProvider._decode_pdu"),
    ("pynetdicom.dul", "DULServiceProvider()._recv_pdu"),
    ("pynetdicom.pdu", "PresentationDataValueItem"),
    ("pynetdicom._handlers", "standard_pdu_recv_handler"),
    ("pynetdicom.dul", "DULServiceProvider().state_machine.current_state"),  # read by the dataset fragment fast path
    ("pynetdicom.dul", "DULServiceProvider().event_queue"),
    ("pynetdicom.dimse", "DIMSEServiceProvider().message"),
)


class PatchError(RuntimeError):
    """The installed library is not one these patches were tested with."""


_lock = threading.Lock()
_installed = False
_receive_file_factory: Callable[..., Any] | None = None
_on_refused: Callable[[Any, int], None] | None = None
_deadlines: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _tested_range() -> str:
    lo, hi = TESTED_PYNETDICOM
    return f">={'.'.join(map(str, lo))},<{'.'.join(map(str, hi))}"


def problems() -> list[str]:
    """What stands in the way of installing the patches on the installed pynetdicom (empty when nothing does)."""
    import importlib

    import pynetdicom

    found = []
    version = getattr(pynetdicom, "__version__", "unknown")
    lo, hi = TESTED_PYNETDICOM
    if not lo <= _version(version) < hi:
        found.append(
            f"pynetdicom {version} is installed; filmgate's patches were tested with pynetdicom{_tested_range()}"
        )
    for module_name, attr in PATCHED:
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                # "Class()": an instance attribute, looked up on a fresh instance
                obj = getattr(obj, part[:-2])(None) if part.endswith("()") else getattr(obj, part)
        except Exception as exc:  # noqa: BLE001 - any failure means the patch target moved
            found.append(f"pynetdicom {version} has no {module_name}.{attr} ({type(exc).__name__}: {exc})")
    try:
        import inspect

        from pynetdicom.association import Association

        if f"time.sleep({_ASSOC_REACTOR_SLEEP})" not in inspect.getsource(Association._run_reactor):
            found.append(f"pynetdicom {version}'s Association._run_reactor no longer sleeps {_ASSOC_REACTOR_SLEEP} s "
                         "(make_reactors_event_driven waits on its message queue instead)")  # fmt: skip
        reactor = inspect.getsource(Association._run_reactor)
        if not all(step in reactor for step in _PAUSE_HANDSHAKE):
            found.append(f"pynetdicom {version}'s Association._run_reactor no longer pauses as hand_back_responses "
                         f"expects (each of {_PAUSE_HANDSHAKE})")  # fmt: skip
        if not all(step in inspect.getsource(Association.run_reactor) for step in _ACCEPTOR_WAIT):
            found.append(f"pynetdicom {version}'s Association.run_reactor no longer waits for its A-ASSOCIATE as "
                         f"end_unassociated expects (each of {_ACCEPTOR_WAIT})")  # fmt: skip
    except (OSError, TypeError) as exc:
        found.append(f"pynetdicom {version}: cannot read Association._run_reactor ({exc})")
    try:
        import inspect

        from pynetdicom import fsm
        from pynetdicom.dimse_messages import DIMSEMessage

        decoder, dt_2 = inspect.getsource(DIMSEMessage.decode_msg), inspect.getsource(fsm.DT_2)
        if not all(step in decoder for step in _DATASET_WRITE) or _DT_2_STEP not in dt_2:
            found.append(f"pynetdicom {version} no longer writes a received dataset fragment as the fast path of "
                         f"_read_data_pdus_without_copies does (DT-2: {_DT_2_STEP}; decode_msg: each of "
                         f"{_DATASET_WRITE})")  # fmt: skip
    except (OSError, TypeError) as exc:
        found.append(f"pynetdicom {version}: cannot read DIMSEMessage.decode_msg or fsm.DT_2 ({exc})")
    return found


def install() -> None:
    """Apply every patch once (later calls do nothing); raises :class:`PatchError` on an untested pynetdicom."""
    global _installed
    with _lock:
        if _installed:
            return
        found = problems()
        if found:
            raise PatchError(
                "; ".join(found) + f". Install a tested version (pip install 'pynetdicom{_tested_range()}') or test "
                "filmgate's patches (filmgate/patches.py, tests/service/test_patches.py) against this one"
            )
        import pynetdicom.dimse_messages as dimse_messages
        from pynetdicom import _config
        from pynetdicom.transport import AssociationSocket

        _config.STORE_SEND_CHUNKED_DATASET = True  # only affects send_c_store(path): the file's bytes as they are
        dimse_messages.NamedTemporaryFile = _receive_file  # type: ignore[assignment]
        AssociationSocket.recv = _bounded_recv  # type: ignore[method-assign]
        _hand_back_responses()
        _read_data_pdus_without_copies()
        _installed = True


def installed() -> bool:
    return _installed


# ------------------------------------------------------------------------------------------------- settings


def receive_datasets_into(factory: Callable[..., Any] | None) -> None:
    """Have every C-STORE SCP in this process write incoming datasets to files made by ``factory(suffix=...)`` (an
    open binary file-like object with ``name``, ``write``, ``file.flush`` and ``close``) while they arrive; handlers
    read ``event.dataset_path``. ``None`` goes back to pynetdicom's in-memory receive."""
    from pynetdicom import _config

    global _receive_file_factory
    _receive_file_factory = factory
    _config.STORE_RECV_CHUNKED_DATASET = factory is not None


def on_pdu_refused(callback: Callable[[Any, int], None] | None) -> None:
    """``callback(assoc, declared_length)`` is called for every PDU refused for its length."""
    global _on_refused
    _on_refused = callback


def pdu_limit(assoc: Any) -> int | None:
    """The longest PDU accepted on ``assoc``: this side's announced maximum plus the margin (None: unbounded)."""
    local = assoc.acceptor if assoc.is_acceptor else assoc.requestor
    announced = int(local.maximum_length or 0)
    if announced <= 0:
        return None
    return max(announced + PDU_MARGIN, MIN_PDU_LIMIT)


def set_read_deadline(assoc: Any, deadline: float | None) -> None:
    """Reads on ``assoc`` must complete by ``deadline`` (``time.monotonic()``); ``None`` lifts it."""
    if deadline is None:
        _deadlines.pop(assoc, None)
    else:
        _deadlines[assoc] = deadline


# How pynetdicom 3.0's acceptor waits for the A-ASSOCIATE indication, and what it does when none comes.
_ACCEPTOR_WAIT = ("primitive = self.dul.receive_pdu(wait=True, timeout=self.acse_timeout)", "if primitive is None:")


def end_unassociated(assoc: Any) -> bool:
    """Call from an ``EVT_CONN_CLOSE`` handler: end at once an acceptor whose connection closed before its
    A-ASSOCIATE-RQ was handed up, and say whether it was one.

    pynetdicom's Association thread waits up to the ACSE timeout for that request, even when the connection is
    already gone (a port scan, a load-balancer probe, a PDU refused for its length, garbage): such a thread held a
    connection slot (``listener.max_connections_per_host``) and made a stopping node wait for it, ten seconds each.
    Handing it ``None``, which is what its wait returns when the timeout passes, makes it take its own timeout path
    (kill, close the socket, return) now. The DUL thread calling this is the only one that puts anything in that
    queue, and nothing more once its connection is closed, so an empty queue stays empty."""
    if not assoc.is_acceptor or assoc.is_established or assoc.requestor.primitive is not None:
        return False
    waiting = assoc.dul.to_user_queue
    with waiting.mutex:
        if waiting.queue:
            return False
    waiting.put(None)
    return True


def tune_reactor(assoc: Any) -> None:
    """Shorten the DUL reactor's idle sleep for one association (call from an ``EVT_CONN_OPEN`` handler)."""
    assoc.dul._run_loop_delay = RUN_LOOP_DELAY


# ------------------------------------------------------------------------------------------------- the patches


# The longest a reactor waits for nothing in particular (its timers, a kill flag, a release it is not woken for).
REACTOR_IDLE_CAP = 0.02
_ASSOC_REACTOR_SLEEP = 0.001  # the literal in pynetdicom 3.0's Association._run_reactor


def make_reactors_event_driven() -> None:
    """Make pynetdicom's two reactor threads per association wait for events instead of polling.

    pynetdicom 3.0 polls: the DUL thread sleeps ``_run_loop_delay`` (0.1 ms here, see :func:`tune_reactor`) and
    the Association thread 1 ms whenever nothing happened, so every open association costs the listener CPU while it
    waits (bench/idle_cpu: 5.9 % of a core per idle association; 4 parallel senders pay it 4 times, pynetdicom#917).
    Here the DUL thread waits in ``select`` on its socket and on a wake-up socket that ``send_pdu`` and ``kill_dul``
    write to; the Association thread waits for its two queues (complete DIMSE messages, ACSE primitives such as a
    release request), which are made to set an event when something is put in them. Both still wake at least every
    :data:`REACTOR_IDLE_CAP` for their timers and flags; incoming data, an outgoing primitive, a complete message or
    a release request wake them at once, so latency falls too (bench/idle_cpu after: 0.6 % of a core).
    """
    import select
    import types
    import weakref

    import pynetdicom.association as association
    import pynetdicom.dul as dul

    if getattr(dul.DULServiceProvider, "_filmgate_event_driven", False):
        return
    install()  # the version check: these patches, too, were made for TESTED_PYNETDICOM only
    wakes: weakref.WeakKeyDictionary[Any, tuple[socket.socket, socket.socket]] = weakref.WeakKeyDictionary()
    wakes_lock = threading.Lock()

    def wake_pair(provider: Any) -> tuple[socket.socket, socket.socket]:
        with wakes_lock:
            pair = wakes.get(provider)
            if pair is None:
                pair = socket.socketpair()
                for s in pair:
                    s.setblocking(False)
                    weakref.finalize(provider, s.close)
                wakes[provider] = pair
            return pair

    def wake(provider: Any) -> None:
        with contextlib.suppress(OSError):  # the pair is full (already woken) or closed (the association is gone)
            wake_pair(provider)[1].send(b"\0")

    send_pdu, kill_dul = dul.DULServiceProvider.send_pdu, dul.DULServiceProvider.kill_dul

    def send_pdu_and_wake(self: Any, primitive: Any) -> None:
        send_pdu(self, primitive)
        wake(self)

    def kill_dul_and_wake(self: Any) -> None:
        kill_dul(self)
        wake(self)

    def dul_sleep(delay: float) -> None:
        provider = threading.current_thread()
        sock = getattr(getattr(provider, "socket", None), "socket", None)
        if not isinstance(provider, dul.DULServiceProvider) or sock is None:
            time.sleep(delay)  # stop_dul's wait in another thread, or no socket yet
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select would not see them
        woken = wake_pair(provider)[0]
        try:
            ready, _, _ = select.select([sock, woken], [], [], REACTOR_IDLE_CAP)
        except (OSError, ValueError):  # the socket was closed under us: the reactor finds out itself
            return
        if woken in ready:
            with contextlib.suppress(OSError):
                while woken.recv(4096):
                    pass

    class WakingQueue(queue.Queue):  # type: ignore[type-arg]
        """A queue that also sets its association's wake-up event when something is put in it."""

        wake: threading.Event

        def _put(self, item: Any) -> None:
            super()._put(item)
            self.wake.set()

    def association_wake(assoc: Any) -> threading.Event | None:
        """The event set when a DIMSE message is complete or the DUL hands up an ACSE primitive (release, abort):
        the two queues the Association reactor reads."""
        wake = getattr(assoc, "_filmgate_wake", None)
        if wake is None:
            queues = (getattr(assoc.dimse, "msg_queue", None), getattr(assoc.dul, "to_user_queue", None))
            if not all(type(q) is queue.Queue for q in queues):
                return None
            wake = threading.Event()
            for q in queues:
                q.wake = wake  # type: ignore[union-attr]
                q.__class__ = WakingQueue  # type: ignore[union-attr]
            assoc._filmgate_wake = wake
        return wake

    def association_sleep(delay: float) -> None:
        assoc = threading.current_thread()
        if delay != _ASSOC_REACTOR_SLEEP or not isinstance(assoc, association.Association):
            time.sleep(delay)
            return
        wake = association_wake(assoc)
        if wake is None:
            time.sleep(delay)
            return
        if not (assoc.dimse.msg_queue.qsize() or assoc.dul.to_user_queue.qsize()):
            wake.wait(REACTOR_IDLE_CAP)
        wake.clear()  # whatever was put is in a queue, and the reactor's loop reads both next

    def time_with(sleep: Callable[[float], None]) -> types.SimpleNamespace:
        names = {k: getattr(time, k) for k in dir(time) if not k.startswith("__")}
        return types.SimpleNamespace(**{**names, "sleep": sleep})

    dul.time = time_with(dul_sleep)  # type: ignore[assignment]
    association.time = time_with(association_sleep)  # type: ignore[assignment]
    dul.DULServiceProvider.send_pdu = send_pdu_and_wake  # type: ignore[method-assign]
    dul.DULServiceProvider.kill_dul = kill_dul_and_wake  # type: ignore[method-assign]
    dul.DULServiceProvider._filmgate_event_driven = True  # type: ignore[attr-defined]


# The steps of Association._run_reactor's pause handshake that the race in _hand_back_responses lives between.
_PAUSE_HANDSHAKE = ("self._is_paused = True", "self._reactor_checkpoint.wait()", "self.dimse.get_msg(block=False)")


_PDU_TYPES = range(0x01, 0x08)
# What pynetdicom 3.0 does with a P-DATA-TF in Sta6 (Evt10 -> DT-2) and with a dataset fragment of a C-STORE-RQ
# received into a file; _write_dataset_fragments does the same for the fragments that change nothing else.
_DT_2_STEP = "dul.assoc.dimse.receive_primitive("
_DATASET_WRITE = ("if self._data_set_file:", "self._data_set_file.write(data[1:])", "self._data_set_file.file.flush()",
                  "if control_header_byte & 2 != 0:")  # fmt: skip


def _read_data_pdus_without_copies() -> None:
    """See the module docstring: a P-DATA-TF's presentation data values become views of the one buffer its body was
    read into."""
    import pynetdicom.dul as dul
    from pynetdicom import evt
    from pynetdicom._handlers import standard_pdu_recv_handler
    from pynetdicom.pdu import P_DATA_TF, PresentationDataValueItem

    logger = dul.LOGGER

    def quiet_for_data(assoc: Any) -> bool:
        """No handler would see a P-DATA-TF PDU: only pynetdicom's standard logger, which logs nothing for one."""
        return all(func is standard_pdu_recv_handler for func, _ in assoc.get_handlers(evt.EVT_PDU_RECV))

    def read_pdu_data(self: Any) -> None:
        sock = self.socket
        try:
            header = sock.recv(6)
        except (OSError, TimeoutError) as exc:
            logger.error("Connection closed before the entire PDU was received")
            logger.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(header) != 6:
            self.event_queue.put("Evt17")
            return
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
        if pdu_type not in _PDU_TYPES:
            logger.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(pdu_length)
        except (OSError, TimeoutError) as exc:
            logger.error("Connection closed before the entire PDU was received")
            logger.exception(exc)
            self.event_queue.put("Evt17")
            return
        if len(body) != pdu_length:
            logger.error(
                f"The received PDU is shorter than expected ({6 + len(body)} of {6 + pdu_length} bytes received)"
            )
            self.event_queue.put("Evt17")
            return
        try:
            if pdu_type == 0x04 and not self.assoc.get_handlers(evt.EVT_DATA_RECV):
                if _write_dataset_fragments(self, body, quiet_for_data):
                    return  # written as DT-2 would have; Sta6 + Evt10 -> DT-2 -> Sta6 leaves nothing else to do
                pdu = P_DATA_TF()
                pdu.presentation_data_value_items = _data_values(body, PresentationDataValueItem)
                if not quiet_for_data(self.assoc):
                    evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
                event = "Evt10"
            else:
                pdu, event = self._decode_pdu(bytearray(header) + body)
            self.event_queue.put(event)
        except Exception as exc:
            logger.error("Unable to decode the received PDU data")
            logger.exception(exc)
            self.event_queue.put("Evt19")
            return
        self._recv_pdu.put(pdu)

    dul.DULServiceProvider._read_pdu_data = read_pdu_data  # type: ignore[method-assign]


def _write_dataset_fragments(dul: Any, body: bytearray, quiet_for_data: Callable[[Any], bool]) -> bool:
    """Write a P-DATA-TF that carries only middle fragments of the dataset being received straight to its file, as
    DT-2 and ``DIMSEMessage.decode_msg`` would, and say whether it did (False: the PDU goes the usual way).

    A 10 MB film arrives in about 80 PDUs (DCMTK sends 128 KiB ones whatever the receiver announces), and each took
    a turn through the event queue, the state machine, a P-DATA primitive and the DIMSE decoder to reach the same
    ``write``: about 14 us per PDU, 1.1 of the listener's 20 CPU ms per uncompressed DX film (storescu sending 20
    films to a bare SCP, six alternating rounds, 2026-12-02). Only a PDU that changes nothing but the file is taken
    here: the association is in Sta6 with no event or PDU queued ahead of this one, the DIMSE message under way is a
    C-STORE-RQ whose command set is complete and whose dataset goes to a file, no handler watches PDUs or state
    transitions, and every presentation data value is a dataset fragment that is not the last. Anything else (a
    command, the last fragment, a malformed item, another state) is left to pynetdicom."""
    if dul.state_machine.current_state != "Sta6" or dul.event_queue.qsize() or dul._recv_pdu.qsize():
        return False
    message = dul.assoc.dimse.message
    out = getattr(message, "_data_set_file", None)
    if out is None:
        return False
    from pynetdicom import evt

    if dul.assoc.get_handlers(evt.EVT_FSM_TRANSITION) or not quiet_for_data(dul.assoc):
        return False
    values = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + 5 > end:
            return False
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or offset + 4 + length > end or body[offset + 5] & 3:  # short, too long, command or last
            return False
        values.append((offset + 6, offset + 4 + length))
        offset += 4 + length
    view = memoryview(body)
    for start, stop in values:
        out.write(view[start:stop])
        out.file.flush()
    return True


def _data_values(body: bytearray, item_class: Any) -> list[Any]:
    """The presentation data value items of a P-DATA-TF body (PS3.8 9.3.5.1: item length, context ID, value), each
    value a view of ``body``; a malformed item raises ValueError (the PDU is invalid: Evt19)."""
    view = memoryview(body)
    items = []
    offset, end = 0, len(body)
    while offset < end:
        if offset + 5 > end:
            raise ValueError("a presentation data value item is cut short")
        (length,) = struct.unpack_from(">L", body, offset)
        if length < 2 or offset + 4 + length > end:  # a context ID and at least the message control header
            raise ValueError(f"a presentation data value item declares {length} bytes")
        item = item_class()
        item.presentation_context_id = body[offset + 4]
        item.presentation_data_value = view[offset + 5 : offset + 4 + length]
        items.append(item)
        offset += 4 + length
    return items


def _hand_back_responses() -> None:
    """Replace ``Association._serve_request``: a response the reactor took while a ``send_*`` method waits for it
    goes back to the head of the message queue (see the module docstring); anything else is served as before."""
    from pynetdicom.association import Association

    serve = Association._serve_request
    if getattr(serve, "_filmgate_hands_back", False):
        return

    def serve_request(self: Any, msg: Any, context_id: int) -> None:
        if not self._reactor_checkpoint.is_set() and getattr(msg, "is_valid_response", False):
            q = self.dimse.msg_queue
            with q.mutex:  # the head: it is the answer the waiting send_* reads next
                q.queue.appendleft((context_id, msg))
                q.unfinished_tasks += 1
                q.not_empty.notify()
            log.debug("handed a %s the association reactor took back to the waiting sender", type(msg).__name__)
            return
        serve(self, msg, context_id)

    serve_request._filmgate_hands_back = True  # type: ignore[attr-defined]
    Association._serve_request = serve_request  # type: ignore[method-assign]


def _receive_file(*args: Any, **kwargs: Any) -> Any:
    """Stands in for ``tempfile.NamedTemporaryFile`` where pynetdicom creates the file of a received dataset."""
    factory = _receive_file_factory
    if factory is None:
        return tempfile.NamedTemporaryFile(*args, **kwargs)
    return factory(suffix=kwargs.get("suffix", ".dcm"))


def _bounded_recv(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the same contract (block until ``nr_bytes`` are read; return what arrived when
    the peer closes), bounded: see the module docstring."""
    sock = cast(socket.socket, self.socket)
    limit = pdu_limit(self.assoc)
    if limit is not None and nr_bytes > limit:
        _refuse(self, sock, nr_bytes, limit)
        return bytearray()  # shorter than declared: pynetdicom ends the association (transport closed)
    deadline = _deadlines.get(self.assoc)
    chunks: list[bytearray] = []
    remaining = nr_bytes
    try:
        while remaining:
            buf = bytearray(min(remaining, CHUNK))
            view = memoryview(buf)
            got_here = 0
            try:
                while got_here < len(buf):
                    if deadline is not None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise TimeoutError
                        sock.settimeout(left)
                    got = sock.recv_into(view[got_here:], len(buf) - got_here)
                    if not got:
                        chunks.append(buf[:got_here])
                        return _join(chunks)
                    got_here += got
            finally:
                view.release()
            chunks.append(buf)
            remaining -= len(buf)
    except TimeoutError:
        # A silent or dripping peer: treated as a closed connection (one log line from pynetdicom, no traceback).
        log.info("closed a connection that sent nothing for its timeout (%s)", _peer(self))
        return _join(chunks)
    return _join(chunks)


def _join(chunks: list[bytearray]) -> bytearray:
    if len(chunks) == 1:
        return chunks[0]
    return bytearray().join(chunks)


def _peer(assoc_socket: Any) -> str:
    try:
        assoc = assoc_socket.assoc
        other = assoc.requestor if assoc.is_acceptor else assoc.acceptor
        return str(other.address)
    except Exception:  # noqa: BLE001 - only for a log line
        return "unknown peer"


def _refuse(assoc_socket: Any, sock: socket.socket, declared: int, limit: int) -> None:
    log.warning(
        "refused a PDU declaring %d bytes from %s (limit %d: the maximum PDU length announced, limits.max_pdu_bytes "
        "for the listener, plus a margin); association aborted", declared, _peer(assoc_socket), limit,
    )  # fmt: skip
    callback = _on_refused
    if callback is not None:  # counted before the peer can see the answer
        with contextlib.suppress(Exception):
            callback(assoc_socket.assoc, declared)
    try:
        sock.sendall(A_ABORT_INVALID_PDU)
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
