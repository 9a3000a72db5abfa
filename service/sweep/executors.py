"""Where the unit of work runs: local worker processes (one per core by default) or a Dask cluster.

Both keep a bounded number of batches in flight (twice the workers), so memory does not grow with the dataset, and
both hand results back as batches finish (not in order: the store does not care). On Ctrl-C the driver calls
:meth:`stop`: nothing new starts, batches already running finish and are returned, so their films are not judged
twice. Local workers ignore SIGINT (a terminal sends it to the whole process group): only the driver decides.

Dask was chosen over Ray for the cluster mode by measurement (see docs/OPERATIONS.md, "Sweeping on a cluster"): the
same unit of work, the same films, and a tenth of the installed size.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from filmgate.config import Config
from filmgate.sweep.work import Item, Row, crashed_row, fingerprint, judge_batch, judge_for

log = logging.getLogger("filmgate.sweep")

Result = tuple[list[Item], str, list[Row]]


class Executor:
    """Runs :func:`judge_batch` on batches, a bounded number in flight; subclasses say where."""

    workers: int = 1
    cfg: Config

    def __init__(self) -> None:
        self._inflight: dict[Any, list[Item]] = {}
        self._stopping = False
        self._described: list[Any] = []  # futures of describe(): the workers load their models meanwhile

    @property
    def judge(self) -> dict[str, Any]:
        """describe() of the workers' judge (waits for the workers to have loaded their models)."""
        if not hasattr(self, "_judge"):
            found = [f.result() for f in self._described]
            if len({d["fingerprint"] for d in found}) > 1:
                raise RuntimeError("the workers loaded different detectors or policies: every worker must run the "
                                   "same filmgate, models and configuration")  # fmt: skip
            self._judge = found[0]
        return self._judge

    def run(self, batches: Iterable[list[Item]]) -> Iterator[Result]:
        """Results of ``batches`` as they finish; after :meth:`request_stop`, only those already running."""
        it = iter(batches)
        limit = 2 * self.workers
        exhausted = False
        while True:
            while not exhausted and not self._stopping and len(self._inflight) < limit:
                batch = next(it, None)
                if batch is None:
                    exhausted = True
                    break
                self._inflight[self._submit(batch)] = batch
            if not self._inflight:
                return
            for fut in self._wait(list(self._inflight)):
                if fut not in self._inflight:
                    continue  # recovered below with the others
                batch = self._inflight.pop(fut)
                if fut.cancelled():
                    continue
                try:
                    fp, rows = fut.result()
                except self.broken:  # a worker died (a decoder crashed, the OOM killer)
                    lost = [batch]
                    if self.loses_all:  # a broken process pool fails every batch in flight
                        lost += self._inflight.values()
                        self._inflight.clear()
                    for b in lost:
                        yield self._isolate(b)
                    continue
                yield batch, fp, rows

    def request_stop(self) -> None:
        """Start nothing new; batches not started yet are cancelled, running ones finish (safe in a signal
        handler: it only sets a flag and cancels futures)."""
        self._stopping = True
        for fut in list(self._inflight):
            self._cancel(fut)

    def _submit(self, batch: list[Item]) -> Any:
        raise NotImplementedError

    broken: tuple[type[BaseException], ...] = ()  # what a batch's result raises when its worker died
    loses_all = False  # whether every batch in flight is lost with it

    def _recover(self) -> None:
        """After a worker died (local workers: a new pool)."""

    def _isolate(self, batch: list[Item]) -> Result:
        """The batch of a worker that died, judged again film by film: a film that kills its worker again becomes an
        undecodable row saying so, the others are judged as usual."""
        log.warning("a sweep worker died; judging its batch of %d films one by one", len(batch))
        self._recover()
        rows: list[Row] = []
        for item in batch:
            try:
                _, got = self._submit([item]).result()
                rows.extend(got)
            except self.broken:
                self._recover()
                rows.append(crashed_row(item, self.cfg, "judging this film killed the worker process (a decoder or "
                                        "detector crashed, or memory ran out)"))  # fmt: skip
        return batch, self.judge["fingerprint"], rows

    def _wait(self, futures: list[Any]) -> Iterable[Any]:
        raise NotImplementedError

    def _cancel(self, fut: Any) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _init_worker() -> None:
    # Only the driver decides when to stop. The models are loaded by describe() (or the first batch), so that a
    # model that cannot load is that call's error with its message, not a broken pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def describe(cfg: Config) -> dict[str, Any]:
    """The judge a worker loaded: its fingerprint, and each detector's name, reason and threshold as its findings
    report them (read from judging a small made-up film, so it holds however the models are packaged). Asked of a
    worker, so the driver never loads models itself."""
    import cv2
    import numpy as np

    judge = judge_for(cfg)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    ok, png = cv2.imencode(".png", ramp)
    found = judge.judge(png.tobytes(), suffix=".png").decision.findings if ok else ()
    detectors = [{"name": f.detector, "reason": f.reason, "threshold": f.threshold} for f in found]
    return {"fingerprint": fingerprint(judge), "detectors": sorted(detectors, key=lambda d: d["name"]),
            "models": {d["name"]: d["version"] for d in judge.detectors.describe()}, "pid": os.getpid()}  # fmt: skip


class LocalExecutor(Executor):
    """``jobs`` worker processes on this machine (forked on Linux: the imports are shared, each loads its models)."""

    def __init__(self, cfg: Config, jobs: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.workers = jobs
        self.pool = self._start()
        # Start every worker now (not on the first batch): they load their models while the driver enumerates.
        self._described = [self.pool.submit(describe, cfg) for _ in range(jobs)]

    def _start(self) -> ProcessPoolExecutor:
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context(method),
                                   initializer=_init_worker)  # fmt: skip

    broken = (BrokenProcessPool,)
    loses_all = True

    def _recover(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._start()

    def _submit(self, batch: list[Item]) -> Future[Any]:
        return self.pool.submit(judge_batch, batch, self.cfg)

    def _wait(self, futures: list[Any]) -> Iterable[Any]:
        return wait(futures, return_when=FIRST_COMPLETED).done

    def _cancel(self, fut: Any) -> None:
        fut.cancel()  # succeeds only for a batch no worker has taken yet

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


class DaskExecutor(Executor):
    """The unit of work on a Dask distributed cluster (``--cluster tcp://scheduler:8786``; ``filmgate[cluster]``).

    Workers need filmgate installed and the films at the same paths (a shared file system); each loads its detectors
    once. Films judged on another worker's models would differ: every batch returns its judge's fingerprint and the
    driver refuses a mismatch.
    """

    def __init__(self, cfg: Config, address: str) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise RuntimeError("--cluster needs Dask distributed: pip install 'filmgate[cluster]'") from exc
        from distributed import KilledWorker

        super().__init__()
        self.broken = (KilledWorker,)  # Dask retries a batch whose worker died on others, then gives up with this
        self.cfg = cfg
        self.client = Client(address, timeout="30s")
        self.workers = max(1, sum(self.client.nthreads().values()))
        self._described = [self.client.submit(describe, cfg, pure=False)]

    def _submit(self, batch: list[Item]) -> Any:
        return self.client.submit(judge_batch, batch, self.cfg, pure=False)

    def _wait(self, futures: list[Any]) -> Iterable[Any]:
        from distributed import wait as dwait

        return dwait(futures, return_when="FIRST_COMPLETED").done

    def _cancel(self, fut: Any) -> None:
        pass  # a Dask batch cannot be told "not started yet" from here: let it finish, its rows are kept

    def close(self) -> None:
        self.client.close()
