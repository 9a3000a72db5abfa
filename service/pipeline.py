"""The workers: claim spooled instances, judge them (decode, detect in batches, decide: :mod:`filmgate.judge`), deliver.

Stages run in their own threads, connected by small bounded queues, so the network thread only ever persists and a
slow stage applies back-pressure instead of filling memory::

    claimer -> decode threads -> inference thread (batches what is waiting) -> delivery threads

An instance leaves the spool (``claimed/`` is cleared) only after every destination of its route has it. A delivery
failure hands the instance back to ``incoming/`` after ``workers.retry_delay``; nothing is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from filmgate import metrics
from filmgate.config import Config
from filmgate.destinations import Delivery, Destination
from filmgate.followup import Aftercare
from filmgate.judge import Examined, Judge, Judgement
from filmgate.policy import known_reasons
from filmgate.record import Arrival, InstanceRecord, iso
from filmgate.records import Recorder
from filmgate.spool import PIPELINE_DEAD_LETTER, SUFFIX, Spool

log = logging.getLogger("filmgate.pipeline")
_STOP = object()
DEPTH_EVERY = 1.0  # seconds between spool depth gauge updates while films arrive


@dataclass
class Item:
    """One instance travelling through the pipeline: where it is in the spool, what the listener knew of it, and the
    judge's work on it (``examined`` after the decode stage, ``judgement`` after the inference stage)."""

    path: Path
    arrival: Arrival
    calling_ae: str = "unknown"  # the metric-safe label of the sender (``unknown`` when nobody said)
    examined: Examined | None = None
    judgement: Judgement | None = None
    attempt: int = 1  # how many times this instance has been taken up (this time included)

    @property
    def received(self) -> float:
        return self.arrival.received_at


@dataclass
class _Stage:
    """One stage thread under the watchdog: what it holds and since when, so that a stalled or dead stage is seen."""

    name: str
    loop: Callable[[_Stage], None]
    thread: threading.Thread | None = None
    held: list[Item] = field(default_factory=list)
    since: float = 0.0
    abandoned: bool = False  # replaced by the watchdog: pass nothing on, end at the next chance
    finished: bool = False  # ended by its stop marker

    @property
    def kind(self) -> str:
        return self.name.split("-")[0]

    def take(self, items: list[Item]) -> None:
        self.since = time.monotonic()
        self.held = items

    def drop(self) -> None:
        self.held = []


class Pipeline:
    """The node's stages around one :class:`~filmgate.judge.Judge`: decode threads call ``judge.examine``, the
    inference thread ``judge.conclude`` on what waits, delivery threads hand each :class:`Judgement` to its route
    (:meth:`_deliver`, the one place a judgement leaves the pipeline). Built by :func:`filmgate.assembly.build`."""

    def __init__(self, cfg: Config, spool: Spool, judge: Judge, destinations: dict[str, Destination],
                 aftercare: Aftercare | None = None, recorder: Recorder | None = None) -> None:  # fmt: skip
        self.cfg = cfg
        self._depth_at = 0.0
        self.aftercare = aftercare
        self.recorder = recorder  # the decision index and the audit trail (filmgate.records)
        self.spool = spool
        self.judge = judge
        self.destinations = destinations
        self._known_reasons = known_reasons(cfg.policy, [d.manifest.reason for d in judge.detectors.detectors])
        w = cfg.workers
        self._decode_q: queue.Queue = queue.Queue(maxsize=w.queue_size)
        self._infer_q: queue.Queue = queue.Queue(maxsize=max(w.queue_size, w.max_batch))
        self._deliver_q: queue.Queue = queue.Queue(maxsize=w.queue_size)
        self._claiming = threading.Event()
        self._abort = threading.Event()
        self._stages: dict[str, _Stage] = {}
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._busy = 0
        self._busy_lock = threading.Lock()
        self._stops = 0  # stop markers the inference stage has seen (kept here: a restarted stage continues it)
        self.models = judge.detectors.describe()

    # ------------------------------------------------------------------------------------------ life cycle

    def start(self) -> None:
        self._claiming.set()
        w = self.cfg.workers
        self._spawn(_Stage("claimer", self._claim_loop))
        for i in range(w.decode_threads):
            self._spawn(_Stage(f"decode-{i}", self._decode_loop))
        self._spawn(_Stage("inference", self._infer_loop))
        for i in range(w.deliver_threads):
            self._spawn(_Stage(f"deliver-{i}", self._deliver_loop))
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()

    def _spawn(self, stage: _Stage) -> None:
        stage.thread = threading.Thread(target=self._run_stage, args=(stage,), name=stage.name, daemon=True)
        self._stages[stage.name] = stage
        stage.thread.start()

    @staticmethod
    def _run_stage(stage: _Stage) -> None:
        try:
            stage.loop(stage)
            stage.finished = True
        except BaseException:  # a bug (or a native panic) escaped the loop: the watchdog starts the stage again
            log.exception("pipeline stage %s died", stage.name)

    def _watch(self) -> None:
        """Start again a stage thread that died, or that holds work for longer than ``workers.stall_timeout``: its
        films go back to the spool (their attempt count bounds how often), the fresh thread takes the queue on."""
        stall = self.cfg.workers.stall_timeout
        while not self._stopping.wait(min(2.0, stall / 4)):
            for stage in list(self._stages.values()):
                if stage.finished or stage.abandoned or self._stopping.is_set():
                    continue
                assert stage.thread is not None
                if stage.thread.is_alive():
                    if not stage.held or time.monotonic() - stage.since <= stall:
                        continue
                    cause = "stalled"
                else:
                    cause = "died"
                self._replace(stage, cause)

    def _replace(self, stage: _Stage, cause: str) -> None:
        held, stage.held = stage.held, []
        stage.abandoned = True
        metrics.STAGE_RESTARTS.labels(stage=stage.kind, cause=cause).inc()
        log.error("pipeline stage %s %s%s; starting it again", stage.name,
                  "died" if cause == "died" else f"made no progress for {self.cfg.workers.stall_timeout:g} s",
                  f" holding {len(held)} instance(s), handed back to the spool" if held else "")  # fmt: skip
        for item in held:
            self.spool.release(item.path)
            self._done()
        self._spawn(_Stage(stage.name, stage.loop))

    def stop(self, timeout: float) -> bool:
        """Stop claiming, finish what is in flight within ``timeout``, hand the rest back. True when drained."""
        self._claiming.clear()
        self._stopping.set()
        self.spool.arrived.set()
        deadline = time.monotonic() + timeout
        claimer = self._stages.get("claimer")
        if claimer is not None and claimer.thread is not None:
            claimer.thread.join(max(0.0, deadline - time.monotonic()))
        # Stop markers flow behind the work: every stage finishes its queue, then passes the marker on.
        for _ in range(self.cfg.workers.decode_threads):
            self._put(self._decode_q, _STOP, deadline)
        threads = [st.thread for st in self._stages.values() if st.thread is not None]
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        drained = not any(t.is_alive() for t in threads)
        if not drained:
            self._abort.set()
            log.warning("drain timeout: handing unfinished instances back to the spool")
        handed = self.spool.release_all()
        if handed:
            log.info("%d claimed instances handed back to incoming/", handed)
        if self.judge.decoder is not None:
            self.judge.decoder.close()
        return drained

    @staticmethod
    def _put(q: queue.Queue, obj: Any, deadline: float) -> None:
        with contextlib.suppress(queue.Full):
            q.put(obj, timeout=max(0.01, deadline - time.monotonic()))

    def idle(self) -> bool:
        return self._busy == 0 and not self.spool.pending()

    # ------------------------------------------------------------------------------------------ stages

    def _claim_loop(self, stage: _Stage) -> None:
        poll = self.cfg.workers.poll_interval
        while self._claiming.is_set() and not stage.abandoned:
            self.spool.arrived.clear()
            took = False
            try:
                pending = self.spool.pending()
            except OSError as exc:  # the spool folder is broken (disk, permissions): keep trying, loudly
                log.error("cannot list the spool (%s); retrying", exc)
                self.spool.arrived.wait(max(poll, 1.0))
                continue
            for path in pending:
                if not self._claiming.is_set():
                    break
                try:
                    claimed = self.spool.claim(path)
                except OSError as exc:
                    log.error("cannot claim a spooled instance (%s); retrying", exc)
                    break
                if claimed is None:
                    continue
                took = True
                with self._busy_lock:
                    self._busy += 1
                arrival = self.spool.arrival(claimed)  # read once: the item carries it from here
                sender = metrics.ae_label(arrival.calling_ae) if arrival.calling_ae else "unknown"
                item = Item(path=claimed, arrival=arrival, calling_ae=sender, attempt=self.spool.count_attempt(claimed))
                while True:
                    try:
                        self._decode_q.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        if not self._claiming.is_set():
                            self.spool.release(claimed)
                            self._done()
                            break
            self._update_depth(force=not took)
            if not took:
                self.spool.arrived.wait(poll)

    def _update_depth(self, force: bool = False) -> None:
        """Set the spool depth gauge: at once when idle, at most every DEPTH_EVERY seconds while films arrive (it
        lists the spool's folders; per claim that cost the workers about 1.5 ms of Python a film, bench/throughput
        --profile)."""
        now = time.monotonic()
        if not force and now - self._depth_at < DEPTH_EVERY:
            return
        self._depth_at = now
        with contextlib.suppress(OSError):
            for state, n in self.spool.depth().items():
                metrics.SPOOL_DEPTH.labels(state=state).set(n)

    def _done(self) -> None:
        with self._busy_lock:
            self._busy -= 1

    def _decode_loop(self, stage: _Stage) -> None:
        while not stage.abandoned:
            try:
                item = self._decode_q.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is _STOP:
                self._infer_q.put(_STOP)
                return
            if self._abort.is_set():
                continue
            stage.take([item])
            try:
                self._decode(item)
            except BaseException as exc:  # never lose an instance to a bug or a panic: quarantine it as undecodable
                log.exception("unexpected error while decoding")
                item.examined = Judge.failed(f"internal error while decoding: {type(exc).__name__}: {exc}")
            if stage.abandoned:
                return  # the watchdog handed this instance back to the spool already
            stage.drop()
            self._infer_q.put(item)

    def _decode(self, item: Item) -> None:
        """Decode stage: the judge examines the spooled file (never raises for a bad film). An instance taken up more
        than ``workers.max_attempts`` times is not examined again: whatever stopped it before (a worker that died on
        it, a stall) would again; it is concluded undecodable with a note."""
        max_attempts = self.cfg.workers.max_attempts
        if item.attempt > max_attempts:
            item.examined = Judge.failed(
                f"taken up {item.attempt - 1} times without being finished (a worker died or stalled on it, or no "
                f"destination took it; workers.max_attempts is {max_attempts}); not examined again"
            )
            return
        ex = self.judge.examine(item.path, suffix=SUFFIX)
        if item.calling_ae == "unknown" and ex.source_ae:  # a file the listener did not name (dropped in by hand)
            item.calling_ae = metrics.ae_label(ex.source_ae)
        item.examined = ex
        ts_label = (UID(ex.transfer_syntax).name or ex.transfer_syntax) if ex.transfer_syntax else "unknown"
        metrics.DECODE_SECONDS.labels(transfer_syntax=ts_label).observe(ex.timings.get("decode", 0.0))

    def _infer_loop(self, stage: _Stage) -> None:
        w = self.cfg.workers
        while self._stops < w.decode_threads and not stage.abandoned:
            try:
                first = self._infer_q.get(timeout=1.0)
            except queue.Empty:
                continue
            if first is _STOP:
                self._stops += 1
                continue
            batch = [first]
            stage.take(batch)
            deadline = time.monotonic() + w.batch_wait_ms / 1000.0
            while len(batch) < w.max_batch:
                try:
                    nxt = self._infer_q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is _STOP:
                    self._stops += 1
                    if self._stops >= w.decode_threads:
                        break
                    continue
                batch.append(nxt)
            try:
                self._infer(batch)
            except BaseException as exc:  # conclude() contains detector failures; this is a bug or a native panic
                log.exception("unexpected error while concluding a batch")
                for it in batch:
                    if it.examined is not None:
                        it.examined.inputs = None
                        it.examined.detector_error = f"internal error while concluding: {type(exc).__name__}: {exc}"
                self._infer(batch)  # no inputs left: only the policy runs, every film gets detector-error
            if stage.abandoned:
                return
            stage.drop()
            for item in batch:
                self._deliver_q.put(item)
        if stage.abandoned:
            return
        for _ in range(w.deliver_threads):
            self._deliver_q.put(_STOP)

    def _infer(self, batch: list[Item]) -> None:
        """Inference stage: the judge concludes on everything that waits together (one batch through the detectors;
        a detector failure gives the batch ``detector-error``, never an exception here)."""
        examined = [it.examined for it in batch]
        assert all(ex is not None for ex in examined)
        for it, judgement in zip(batch, self.judge.conclude(examined), strict=True):  # type: ignore[arg-type]
            it.judgement = judgement
            it.examined = None

    def _deliver_loop(self, stage: _Stage) -> None:
        while not stage.abandoned:
            try:
                item = self._deliver_q.get(timeout=1.0)
            except queue.Empty:
                continue
            if item is _STOP:
                return
            if self._abort.is_set():
                continue
            stage.take([item])
            try:
                self._deliver(item)
            except BaseException as exc:  # a bug or a panic: the instance is still in the spool; try it later
                log.exception("unexpected error while delivering")
                if not stage.abandoned:
                    self._retry_or_give_up(item, f"internal error while delivering: {type(exc).__name__}: {exc}")
            if stage.abandoned:
                return
            stage.drop()
            self._done()
            self._update_depth()

    def _deliver(self, item: Item) -> None:
        """Delivery stage: the one place a :class:`Judgement` leaves the pipeline. Every destination of its route gets
        the instance with its layout fields and sidecar record (and a corrected derived film, when one passes, goes
        to the accept route beside it); then the study tracker notes it, the spool forgets it and the metrics count
        it."""
        j = item.judgement
        assert j is not None
        d = j.decision
        shadow = self.cfg.policy.mode == "shadow"
        routed = "accept" if d.accepted or shadow else "quarantine"  # shadow mode: decide, record, but accept all
        route = self.cfg.routes.accept if routed == "accept" else self.cfg.routes.quarantine
        fields, record = self._fields_and_record(j, item)
        if shadow:  # the accept folders see an accepted film; the sidecar and the index keep the would-be decision
            fields.update(outcome="accept", reason="accepted", reasons="accepted")
            record.update(shadow=True, routed=routed)
        corrected = self.aftercare.correct(item.path, j) if self.aftercare and not shadow else None
        if corrected is not None:
            record["corrected"] = {**corrected.links["derived"], "outcome": corrected.judgement.decision.outcome,
                                   "reasons": list(corrected.judgement.decision.reasons)}  # fmt: skip
        rec = self.recorder
        if rec is not None:  # the index row and the audit event, before any destination has it
            kept = rec.keep(item.path, item.received) if routed == "quarantine" else None
            rec.judged(item.path, j, record, received=item.received, routed=routed, kept=kept)
        try:
            for name in route:
                self.destinations[name].deliver(Delivery(path=item.path, fields=fields, record=record))
            if corrected is not None and corrected.judgement.decision.accepted:
                d_fields, d_record = self._fields_and_record(corrected.judgement, item)
                d_record.update(derived_from=corrected.links["derived_from"], derivation=corrected.description)
                if rec is not None:
                    rec.judged(corrected.path, corrected.judgement, d_record, received=item.received, routed="accept",
                               kept=None)  # fmt: skip
                for name in self.cfg.routes.accept:
                    self.destinations[name].deliver(Delivery(path=corrected.path, fields=d_fields, record=d_record))
                if rec is not None:
                    rec.delivered(corrected.path.name)
        except Exception as exc:
            self._retry_or_give_up(item, f"delivery to {', '.join(route)} failed: {type(exc).__name__}: {exc}")
            return
        if self.aftercare is not None:
            try:
                self.aftercare.note(item.path, j)
                if corrected is not None:
                    self.aftercare.note(corrected.path, corrected.judgement,
                                        derived_from=corrected.links["derived_from"]["sop_instance_uid"])  # fmt: skip
                    self.aftercare.done_with(corrected)
            except Exception:  # the instance is delivered: a study note lost is a summary short, never a loop
                log.exception("noting a delivered instance for its study failed")
        if rec is not None:
            rec.delivered(item.path.name)  # recorded before the spool lets it go: a crash in between re-delivers
        self.spool.finish(item.path)
        metrics.ROUTED.labels(route=routed).inc()
        if shadow and not d.accepted:
            for reason in d.reasons:
                metrics.SHADOW_WOULD_QUARANTINE.labels(reason=reason).inc()
        metrics.declare_sender(item.calling_ae, self._known_reasons)
        metrics.DECISIONS.labels(outcome=d.outcome, calling_ae=item.calling_ae).inc()
        for reason in d.reasons:
            metrics.QUARANTINE_REASONS.labels(reason=reason, calling_ae=item.calling_ae).inc()
        metrics.END_TO_END_SECONDS.observe(max(0.0, time.time() - item.received))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s -> %s %s", fields.get("SOPInstanceUID"), d.outcome, list(d.reasons))

    def _fields_and_record(self, j: Judgement, item: Item) -> tuple[dict[str, str], dict[str, Any]]:
        """The layout fields and the sidecar record of a judged instance, both from its one :class:`InstanceRecord`."""
        rec = self.record(j, item)
        return rec.layout_fields(), rec.sidecar()

    def record(self, j: Judgement, item: Item) -> InstanceRecord:
        """What the node knows of a judged instance: its arrival, its header's identity, the decision."""
        f = j.fields
        return InstanceRecord(
            arrival=item.arrival,
            calling_ae=item.calling_ae,
            # The header could not be read: the UID the listener's check read (or the previous version's name held).
            sop_instance_uid=f.get("SOPInstanceUID") or item.arrival.sop_instance_uid,
            sop_class_uid=f.get("SOPClassUID", ""),
            study_instance_uid=f.get("StudyInstanceUID", ""),
            series_instance_uid=f.get("SeriesInstanceUID", ""),
            modality=f.get("Modality", ""),
            transfer_syntax=j.transfer_syntax,
            decision=j.decision,
            models=self.models,
            decided_at=time.time(),
            timings=j.timings,
        )

    def _retry_or_give_up(self, item: Item, error: str) -> None:
        """A delivery failed: hand the instance back to the spool after its back-off (``workers.retry_delay``,
        doubling, at most ``retry_delay_max``), or, after ``workers.max_attempts``, move it to the pipeline's
        dead-letter folder with a note (never retried forever, never dropped)."""
        w = self.cfg.workers
        if item.attempt >= w.max_attempts:
            note = {"destination": PIPELINE_DEAD_LETTER, "error": error, "attempts": item.attempt,
                    "at": iso(time.time()), "received_at": iso(item.received)}  # fmt: skip
            try:
                self.spool.dead_letter_instance(item.path, note)
            except OSError as exc:  # not even that: keep it in the spool, try again later
                log.error("cannot move an undeliverable instance to the dead-letter folder (%s)", exc)
            else:
                metrics.DEAD_LETTERS.labels(destination=PIPELINE_DEAD_LETTER).inc()
                log.error("gave up on an instance after %d attempts (%s); moved to %s", item.attempt, error,
                          self.spool.dead_letter(PIPELINE_DEAD_LETTER))  # fmt: skip
                return
        delay = min(w.retry_delay * 2 ** max(0, item.attempt - 1), w.retry_delay_max)
        log.error("%s; attempt %d of %d, trying again in %.0f s", error, item.attempt, w.max_attempts, delay)
        timer = threading.Timer(delay, self.spool.release, args=(item.path,))
        timer.daemon = True
        timer.start()
