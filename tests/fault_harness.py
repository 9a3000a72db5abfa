"""The fault and fuzz harness: the real node in its own process group, memory-limited, its spool on a small tmpfs in
a mount namespace, attacked through real sockets; then every acknowledged instance is accounted for.

Used by ``tests/service/test_fuzz.py`` (a few hundred cases, in CI) and ``bench/fault_soak.py`` (thousands of cases
and ``kill -9`` cycles, run by hand). What it throws at the node:

* PDU-length bombs (a header declaring a 4 GB PDU), garbage and truncated PDUs, idle TCP connections, association
  floods;
* mutated datasets (byte flips, truncation, wild lengths, VR and transfer syntax mismatches, inserted bytes) of small
  films in several transfer syntaxes, and hostile films made on purpose (huge Rows/Columns/NumberOfFrames, JPEG 2000
  headers declaring 60000x60000, deflate bombs, RLE that makes the decoder panic: :mod:`tests.hostile`);
* a full spool (a filler file written into the node's tmpfs through ``/proc/<pid>/root``);
* a DICOM destination that refuses (only some syntaxes, temporary failures) and goes down and comes back, and one
  that is down throughout.

What is checked (:meth:`Harness.account`): every acknowledged instance ends, byte-identical, exactly once at each
destination of its route or in that destination's dead letter; nothing waits in the spool after the drain; C-ECHO
answers; the process group's memory stayed under its limit; the metrics count what happened.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from filmgate.dataset_io import file_meta_end
from tests import hostile
from tests.helpers import REPO, Gate, Receiver, dataset_bytes, film_pixels, free_port, make_dicom, wait_for

DX = hostile.DX


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key(data: bytes, syntax: str | None = None) -> str:
    """What identifies an instance as sent: its transfer syntax (from the file meta, unless given) and its dataset
    bytes (a meta that lies about the syntax makes another instance of the same bytes)."""
    if syntax is None:
        syntax = file_meta_end(data[:1 << 16])[1] or ""
    return digest(syntax.encode() + b"|" + dataset_bytes(data))


# ----------------------------------------------------------------------------------------------------- the node


@dataclass
class Node(Gate):
    """A :class:`Gate` whose spool is a tmpfs of ``spool_mb`` in its own mount namespace (held by a sleeping
    process, so the spool outlives a ``kill -9`` of the node), started in its own process group with an address-space
    limit per process (``prlimit --as``), its memory (the group's summed RSS) sampled all along."""

    spool_mb: int = 64
    as_limit: int = 8 << 30  # per process: a hard stop for the machine's sake; the test's limit is on the RSS
    holder: subprocess.Popen | None = None
    peak_rss: int = 0
    _sampling: threading.Event = field(default_factory=threading.Event)

    def mount(self) -> None:
        spool = Path(self.config["spool"]["path"])
        spool.mkdir(parents=True, exist_ok=True)
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size={self.spool_mb}m filmgate-spool '{spool}' && echo mounted && exec sleep 100000"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().strip()
        assert line == "mounted", f"cannot mount a tmpfs in a mount namespace (root needed): {line!r}"

    def in_ns(self, path: Path) -> Path:
        """``path`` as the node sees it (inside its mount namespace)."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root") / path.relative_to("/")

    @property
    def spool_view(self) -> Path:
        return self.in_ns(Path(self.config["spool"]["path"]))

    def start(self, wait: bool = True) -> Node:
        if self.holder is None:
            self.mount()
        assert self.holder is not None
        cmd = ["nsenter", "-t", str(self.holder.pid), "-m", "--", "prlimit", f"--as={self.as_limit}", "--",
               sys.executable, "-m", "filmgate.cli", "serve", "--config", str(self.config_path)]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._sampling.clear()
        threading.Thread(target=self._sample, args=(self.proc.pid,), daemon=True).start()
        if wait:
            self.wait_ready(120)
        return self

    def _sample(self, pgid: int) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._sampling.wait(0.05):
            total = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                with contextlib.suppress(OSError, IndexError, ValueError):
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[2]) == pgid:  # the process group
                        total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
            self.peak_rss = max(self.peak_rss, total)

    def kill9(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._sampling.set()

    def stop(self, timeout: float = 60.0) -> int:
        code = super().stop(timeout)
        self._sampling.set()
        return code

    def unmount(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill9()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(10)


# ----------------------------------------------------------------------------------------------------- cases


BASE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless,
                 JPEG2000Lossless)  # fmt: skip


def real_film(folder: Path, film: Path, name: str, syntax: str = ExplicitVRLittleEndian) -> Path:
    """A DX film (new UIDs) with the pixels of a real radiograph, in ``syntax``: what a hospital sends."""
    from pydicom import dcmread

    raw = folder / f"{name}.raw.dcm"
    make_dicom(film_pixels(film), raw)
    if syntax == ExplicitVRLittleEndian:
        return raw.rename(folder / f"{name}.dcm")
    ds = dcmread(raw)
    raw.unlink()
    if syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax, encoding_plugin="pydicom" if syntax == RLELossless else "pylibjpeg",
                    generate_instance_uid=False)  # fmt: skip
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    return hostile.save(ds, folder / f"{name}.dcm")


def base_films(folder: Path, films: list[Path]) -> list[bytes]:
    """Each real film in each base syntax, as file bytes (made once; the mutations start from these)."""
    out = []
    for i, film in enumerate(films):
        for syntax in BASE_SYNTAXES:
            path = real_film(folder, film, f"base-{i}-{syntax}", syntax)
            out.append(path.read_bytes())
            path.unlink()
    return out


def mutated_cases(folder: Path, bases: list[bytes], count: int, seed: int) -> list[tuple[str, Path]]:
    """``count`` random mutations of the base films."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        data = bases[i % len(bases)]
        start = len(data) - len(dataset_bytes(data))
        kind, bad = hostile.mutate(data, rng, start=start)
        path = folder / f"mut-{seed}-{i:05d}-{kind}.dcm"
        path.write_bytes(bad)
        out.append((kind, path))
    return out


def hostile_cases(folder: Path, seed: int) -> list[tuple[str, Path]]:
    """The films made on purpose to hurt (one of each kind per seed)."""
    f = folder
    return [
        ("huge-rows-columns", hostile.huge_header(f / f"huge-{seed}.dcm")),
        ("huge-frames", hostile.huge_header(f / f"frames-{seed}.dcm", 4096, 4096, frames=100000)),
        ("j2k-60000", hostile.j2k_declaring(f / f"j2k-{seed}.dcm", 60000, 60000, seed=seed)),
        ("j2k-60000-header", hostile.j2k_declaring(f / f"j2kh-{seed}.dcm", 60000, 60000, header_too=True, seed=seed)),
        ("deflate-bomb", hostile.deflate_bomb(f / f"bomb-{seed}.dcm", 200 << 20, seed=seed)),
        ("rle-panic", hostile.panicking_rle(f / f"panic-{seed}.dcm", seed=seed)),
    ]


# ----------------------------------------------------------------------------------------------------- attacks


def _recv_until_closed(sock: socket.socket, timeout: float) -> bool:
    """True when the peer closed (or reset) the connection within ``timeout``."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False
    return False


def pdu_bomb(port: int, pdu_type: int = 0x01) -> bool:
    """A PDU header declaring 0xFFFFFFFF bytes: the node must close the connection, not allocate 4 GB."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(struct.pack(">BBI", pdu_type, 0, 0xFFFFFFFF) + b"\x00" * 64)
        return _recv_until_closed(s, 10)


def garbage(port: int, rng: random.Random) -> None:
    """Random bytes, or a valid-looking PDU header with a lying length and garbage behind it."""
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        if rng.random() < 0.5:
            s.sendall(bytes(rng.randrange(256) for _ in range(rng.randint(1, 2048))))
        else:
            body = bytes(rng.randrange(256) for _ in range(rng.randint(0, 512)))
            declared = rng.choice([len(body), len(body) + 10, max(0, len(body) - 10), 0, 1 << 20])
            s.sendall(struct.pack(">BBI", rng.choice([1, 2, 3, 4, 5, 6, 7, 0, 9, 0xFF]), 0, declared) + body)
        _recv_until_closed(s, 1)


def idle_connections(port: int, n: int) -> list[socket.socket]:
    """``n`` TCP connections that never say anything (port scanners, load-balancer probes)."""
    out = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            out.append(socket.create_connection(("127.0.0.1", port), timeout=10))
    return out


def association_flood(port: int, n: int) -> collections.Counter:
    """``n`` associations at once, each released at once; returns how many were accepted / refused."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    results: collections.Counter = collections.Counter()

    def one() -> None:
        ae = AE(ae_title="FLOOD")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
        assoc = ae.associate("127.0.0.1", port, ae_title="FILMGATE")
        results["accepted" if assoc.is_established else "refused"] += 1
        if assoc.is_established:
            assoc.release()

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def echo(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 30
    assoc = ae.associate("127.0.0.1", port, ae_title="FILMGATE")
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0
    finally:
        assoc.release()


# ----------------------------------------------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """What the sender knows: every answer, and the dataset bytes of every acknowledged instance."""

    acked: collections.Counter = field(default_factory=collections.Counter)  # sha256 of dataset bytes -> times
    answers: collections.Counter = field(default_factory=collections.Counter)  # status (None: no answer)
    kinds: dict[str, str] = field(default_factory=dict)  # sha -> case kind
    silent: list[tuple[str, float, str]] = field(default_factory=list)  # (kind, seconds, file) of stores never answered
    keep_silent: Path | None = None  # where to keep a copy of each file whose store was never answered
    answer_timeout: float = 15.0  # seconds a C-STORE may go unanswered before it counts as never answered

    def store(self, port: int, cases: list[tuple[str, Path]], per_association: int = 25) -> None:
        """Send the files' bytes as they are (chunked, no re-encoding), ``per_association`` per association."""
        from pynetdicom import AE

        from filmgate import patches

        # The sender is pynetdicom with filmgate's patches (STORE_SEND_CHUNKED_DATASET: the file's bytes as they are;
        # and the fix of pynetdicom's requestor race that otherwise loses about 1 answer in 250-500 under load).
        patches.install()
        for i in range(0, len(cases), per_association):
            group = cases[i : i + per_association]
            metas = {}
            for _kind, path in group:
                try:
                    m = read_file_meta_info(path)
                    metas[path] = (str(m.MediaStorageSOPClassUID or DX), str(m.TransferSyntaxUID))
                except Exception:
                    self.answers["unsendable"] += 1
            ae = AE(ae_title="FUZZSCU")
            ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 60
            ae.dimse_timeout = self.answer_timeout
            for sop, ts in sorted(set(metas.values()))[:120]:
                ae.add_requested_context(sop, [ts])
            assoc = ae.associate("127.0.0.1", port, ae_title="FILMGATE")
            for kind, path in group:
                if path not in metas:
                    continue
                if not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", port, ae_title="FILMGATE")
                    if not assoc.is_established:
                        self.answers[None] += 1
                        continue
                t0 = time.monotonic()
                try:
                    rsp = assoc.send_c_store(path)
                    status = int(rsp.Status) if rsp and "Status" in rsp else None
                except Exception:  # pynetdicom refuses to send some broken files itself: never sent
                    status = "unsendable"
                self.answers[status] += 1
                if status is None:
                    self.silent.append((kind, round(time.monotonic() - t0, 1), path.name))
                    if self.keep_silent is not None:
                        self.keep_silent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(path, self.keep_silent / path.name)
                if status == 0x0000:
                    sha = key(path.read_bytes())
                    self.acked[sha] += 1
                    self.kinds[sha] = kind
            if assoc.is_established:
                assoc.release()


def delivered(folder: Path) -> collections.Counter:
    """sha256 of the dataset bytes of every DICOM file under ``folder`` (sidecars and notes left out)."""
    out: collections.Counter = collections.Counter()
    if folder.is_dir():
        for p in folder.rglob("*.dcm"):
            out[key(p.read_bytes())] += 1
    return out


def waiting(spool: Path) -> list[Path]:
    """Instances still waiting in the spool: incoming, claimed, the outboxes, partial files in tmp."""
    return [p for part in ("incoming", "claimed", "outbox", "tmp") for p in (spool / part).rglob("*")
            if p.is_file() and p.suffix == ".dcm"]  # fmt: skip


@dataclass
class Harness:
    """One node with its destinations, the attacks, and the accounting."""

    root: Path
    films: list[Path]  # real radiographs (val split): their pixels make the films sent
    spool_mb: int = 128
    memory_limit: int = 2 << 30
    node: Node = field(init=False)
    pacs: Receiver = field(init=False)
    ledger: Ledger = field(default_factory=Ledger)
    events: collections.Counter = field(default_factory=collections.Counter)
    seconds: dict[str, float] = field(default_factory=dict)  # wall time per phase, for the figures

    @contextlib.contextmanager
    def phase(self, name: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - t0, 2)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.dead = self.root / "dead-letter"
        # The research PACS: takes uncompressed and deflated films only (the rest is refused for good: no
        # presentation context), and answers 0xA700 (out of resources) now and then; it goes down and comes back.
        self.pacs = Receiver(free_port(), "PACS", syntaxes=[ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                            DeflatedExplicitVRLittleEndian], keep_raw=True)  # fmt: skip
        self.pacs_refusals = 0
        dicom = {"type": "dicom", "host": "127.0.0.1", "timeout": 10, "retries": 30, "backoff_initial": 0.2,
                 "backoff_factor": 2.0, "backoff_max": 2.0}  # fmt: skip
        gate = Gate.create(
            self.root / "node",
            accept_layout="{SOPInstanceUID}.dcm",
            quarantine_layout="{reason}/{StudyInstanceUID}/{SOPInstanceUID}.dcm",
            workers={"processes": 1, "drain_timeout": 20.0, "stall_timeout": 60.0, "retry_delay": 0.5,
                     "max_attempts": 6},
            limits={"max_dataset_bytes": 64 << 20, "decode_timeout": 30.0, "decode_memory_bytes": 1 << 30},
            spool={"path": str(self.root / "node" / "spool"), "fsync": True, "min_free_bytes": 16 << 20,
                   "min_free_percent": 1.0},
            destinations={
                # Dead letters on the disk, not in the small spool: they are what the run leaves behind.
                "pacs": {**dicom, "ae_title": "PACS", "port": self.pacs.port, "dead_letter": str(self.dead / "pacs")},
                "archive": {**dicom, "ae_title": "ARCHIVE", "port": free_port(), "retries": 0,
                            "backoff_initial": 0.02, "backoff_max": 0.2, "dead_letter": str(self.dead / "archive")},
                "quarantine": {"type": "folder", "path": str(self.root / "node" / "quarantine"),
                               "layout": "{reason}/{StudyInstanceUID}/{SOPInstanceUID}.dcm"},
            },
            routes={"accept": ["pacs", "archive"], "quarantine": ["quarantine"]},
        )  # fmt: skip
        self.node = Node(root=gate.root, dicom_port=gate.dicom_port, http_port=gate.http_port, config=gate.config,
                         spool_mb=self.spool_mb)  # fmt: skip
        self.cases_dir = self.root / "cases"
        self.cases_dir.mkdir(exist_ok=True)
        self._bases: list[bytes] = []

    # ------------------------------------------------------------------------------------------ phases

    def start(self) -> None:
        self.pacs.start()
        self.node.start()

    def network_attacks(self, rng: random.Random, *, bombs: int = 3, junk: int = 20, flood: int = 60) -> None:
        port = self.node.dicom_port
        for t in (0x01, 0x04, 0x07)[:bombs]:
            assert pdu_bomb(port, t), f"a PDU declaring 4 GB (type {t:#x}) was not closed by the node"
            self.events["pdu-bomb"] += 1
        for _ in range(junk):
            garbage(port, rng)
            self.events["garbage"] += 1
        self.events.update(association_flood(port, flood))

    def datasets(self, count: int, seed: int) -> None:
        if not self._bases:
            self._bases = base_films(self.cases_dir, self.films)
        cases = hostile_cases(self.cases_dir, seed) + mutated_cases(self.cases_dir, self._bases, count, seed)
        random.Random(seed).shuffle(cases)
        self.ledger.store(self.node.dicom_port, cases)
        for _, path in cases:
            path.unlink()

    def valid(self, count: int, seed: int) -> None:
        """``count`` real films, new UIDs, uncompressed: what the gate accepts and forwards."""
        cases = [("valid", real_film(self.cases_dir, self.films[i % len(self.films)], f"valid-{seed}-{i}"))
                 for i in range(count)]  # fmt: skip
        self.ledger.store(self.node.dicom_port, cases)
        for _, path in cases:
            path.unlink()

    def full_spool(self) -> int | None:
        """Fill the spool's tmpfs but for 1 MiB, send one film: the answer; then free it again."""
        filler = self.node.spool_view / "filler"
        st = os.statvfs(self.node.spool_view)
        free = st.f_bavail * st.f_frsize
        with open(filler, "wb") as fh:
            fh.truncate(0)
            chunk = b"\0" * (1 << 20)
            left = max(0, free - (1 << 20))
            with contextlib.suppress(OSError):
                while left > 0:
                    fh.write(chunk[: min(left, len(chunk))])
                    left -= len(chunk)
        big = hostile.save(hostile.small_dataset(1024, 1024, seed=7), self.cases_dir / "big.dcm")  # 2 MiB
        before = self.ledger.answers.copy()
        self.ledger.store(self.node.dicom_port, [("full-spool", big)])
        answer = next(iter((self.ledger.answers - before).elements()), None)
        filler.unlink()
        self.events["full-spool"] += 1
        return answer

    def pacs_outage(self, seconds: float) -> None:
        self.pacs.stop()
        self.events["pacs-down"] += 1
        time.sleep(seconds)  # the outage itself (not synchronisation): the forwarder must ride it out
        self.pacs.start()

    # ------------------------------------------------------------------------------------------ accounting

    def drain(self, timeout: float = 180.0) -> None:
        wait_for(lambda: not waiting(self.node.spool_view), timeout, "the spool to drain")

    def account(self, *, exact: bool = True) -> dict[str, int]:
        """Every acknowledged instance exactly once per destination of its route (or its dead letter), byte for
        byte; returns the figures. With ``exact=False`` (after ``kill -9``) a DICOM peer may have an instance more
        than once: the node died between the peer's answer and forgetting the instance, and sends it again (a PACS
        keeps one per SOP Instance UID); none may be missing."""
        duplicates = 0
        quarantine = delivered(self.root / "node" / "quarantine")
        pacs = collections.Counter(digest(ts.encode() + b"|" + raw) for ts, raw in self.pacs.raw)
        dead = {name: delivered(self.dead / name) for name in ("pacs", "archive")}
        pipeline_dead = delivered(self.node.spool_view / "dead-letter" / "pipeline")
        problems = []
        for sha, times in self.ledger.acked.items():
            kind = self.ledger.kinds[sha]
            at_pacs, at_archive = pacs[sha] + dead["pacs"][sha], dead["archive"][sha]
            if quarantine[sha]:
                # A folder keeps identical bytes once; anything else is a second copy beside the first.
                if (quarantine[sha], at_pacs, at_archive) != (1, 0, 0):
                    problems.append(f"{kind}: quarantined {quarantine[sha]} time(s), at pacs {at_pacs}, archive "
                                    f"{at_archive}")  # fmt: skip
            elif pipeline_dead[sha]:
                continue  # the pipeline gave up on it (a note says why): accounted for, not lost
            elif not exact and at_pacs >= times and at_archive >= times:
                duplicates += at_pacs - times
            elif (at_pacs, at_archive) != (times, times):
                problems.append(f"{kind}: acknowledged {times} time(s), accepted, at pacs {at_pacs} time(s), archive "
                                f"dead letter {at_archive}")  # fmt: skip
        assert not problems, f"{len(problems)} of {len(self.ledger.acked)} acknowledged instances: {problems[:10]}"
        return {
            "acknowledged": len(self.ledger.acked), "quarantined": sum(quarantine.values()),
            "forwarded": len(set(pacs) & set(self.ledger.acked)), "pacs_dead": sum(dead["pacs"].values()),
            "archive_dead": sum(dead["archive"].values()), "pipeline_dead": sum(pipeline_dead.values()),
            "sent_again_after_kill": duplicates,
        }  # fmt: skip

    def sidecars(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in (self.root / "node" / "quarantine").rglob("*.json")]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pacs.stop()
        self.node.unmount()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.cases_dir)
