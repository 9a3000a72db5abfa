"""The sweep's driver: find the films, judge those without a current result, keep every row, write the outputs.

One process drives (the only writer of the store); the judging runs in :mod:`.executors`. The first Ctrl-C (SIGINT,
or SIGTERM) stops cleanly: no new batch starts, the running ones finish and are kept, the outputs are written for
what was judged (``summary.json`` says ``"complete": false``) and the exit status is 130; a rerun resumes. A second
Ctrl-C aborts at once (the store still holds every committed batch).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filmgate.config import Config
from filmgate.sweep import outputs, report, sort
from filmgate.sweep.executors import DaskExecutor, Executor, LocalExecutor
from filmgate.sweep.sources import candidates, listed
from filmgate.sweep.store import Store
from filmgate.sweep.work import Item, Row

INTERRUPTED = 130


@dataclass(frozen=True)
class SweepOptions:
    """What ``filmgate sweep`` was asked (from the command line; the judge's settings come from the Config)."""

    out: Path
    sources: tuple[str, ...] = ()
    from_list: str | None = None
    jobs: int = 0  # 0: every core
    batch: int = 16
    cluster: str | None = None
    sort_into: Path | None = None
    sort_mode: str = "link"
    review: bool = False
    progress: bool | None = None  # None: when stderr is a terminal
    report_limit: int = 500  # films per contact sheet
    accepted_sample: int = 48
    pacs: Any = None  # a filmgate.sweep.pacs.PacsQuery when the source is dicom://...


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def make_executor(cfg: Config, opts: SweepOptions) -> Executor:
    if opts.cluster:
        return DaskExecutor(cfg, opts.cluster)
    return LocalExecutor(cfg, opts.jobs or default_jobs())


def _batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    batch: list[Item] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _sampler(films: int, sample: int) -> Callable[[str], bool]:
    """Which accepted films keep a thumbnail: a stable pseudo-random share, about 4x the report's sample."""
    share = min(1.0, 4.0 * sample / max(1, films))
    limit = int(share * (1 << 32))
    return lambda key: zlib.crc32(key.encode()) < limit


class _Progress:
    """A tqdm bar on stderr with rate and time left; nothing when stderr is not a terminal (unless forced)."""

    def __init__(self, total: int, done: int, enabled: bool | None) -> None:
        from tqdm import tqdm

        on = sys.stderr.isatty() if enabled is None else enabled
        sized = shutil.get_terminal_size((0, 0)).columns > 0  # a terminal that reports no width gets 100 columns
        self.bar = tqdm(total=total, initial=done, unit="film", dynamic_ncols=sized, ncols=None if sized else 100,
                        smoothing=0.05, disable=not on, file=sys.stderr)  # fmt: skip

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def sweep(cfg: Config, opts: SweepOptions) -> int:
    """Run a sweep; returns the exit status (0, or 130 when interrupted)."""
    started = time.time()
    store = Store(opts.out)
    try:
        executor = make_executor(cfg, opts)  # workers start and load their models while the sources are listed
        try:
            if opts.pacs is None:
                own = [opts.out, *([opts.sort_into] if opts.sort_into else [])]  # never swept, even inside a source
                store.add_files(_chain(candidates(opts.sources, own), listed(opts.from_list) if opts.from_list else ()))
            else:
                from filmgate.sweep.pacs import find_instances

                find_instances(opts.pacs, store)  # C-FIND: every instance is known before judging starts
        except BaseException:
            executor.close()
            raise
        try:
            fp = executor.judge["fingerprint"]
            store.set("fingerprint", fp)
            if opts.pacs is not None:
                from filmgate.sweep.pacs import pacs_items

                items_fn: Callable[[Callable[[str], bool]], Iterable[Item]] = lambda keep: pacs_items(  # noqa: E731
                    opts.pacs, store, fp, keep)
            else:
                items_fn = lambda keep: (Item(key, path, abspath, thumb=keep(key))  # noqa: E731
                                         for key, path, abspath in store.pending(fp))  # fmt: skip
            films, done = store.counts(fp)
            judged, interrupted = _drive(store, executor, fp, items_fn, films, done, opts)
        finally:
            executor.close()
        films, done = store.counts(fp)
        complete = not interrupted and done == films
        run = {
            "sources": [*opts.sources, *([opts.from_list] if opts.from_list else []),
                        *([opts.pacs.url] if opts.pacs is not None else [])],
            "complete": complete, "judged_this_run": judged, "jobs": executor.workers,
            "cluster": opts.cluster or None, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
            "seconds": round(time.time() - started, 2),
        }  # fmt: skip
        summary = outputs.write_tables(store, fp, [d["name"] for d in executor.judge["detectors"]], opts.out, run)
        if opts.sort_into is not None:
            placed = sort.sort_into(store, fp, opts.sort_into, opts.sort_mode)
            if placed.get("not kept"):
                print(f"filmgate sweep: {placed['not kept']} PACS films are not in {opts.sort_into}: they were judged "
                      "by an earlier run without --sort-into, which kept no bytes (sweep again into a fresh --out)",
                      file=sys.stderr)  # fmt: skip
        report.write_report(store, fp, executor.judge["detectors"], summary, opts.out, limit=opts.report_limit,
                            sample=opts.accepted_sample)  # fmt: skip
        if opts.review:
            from filmgate.sweep.review import load_into_review

            n = load_into_review(cfg, store, fp, executor.judge.get("models", {}), str(opts.out))
            print(f"filmgate sweep: {n} films recorded in the review console's index", file=sys.stderr)
        dec = summary["by_decision"]
        print(f"filmgate sweep: {summary['films']} films ({dec.get('accept', 0)} accepted, "
              f"{dec.get('quarantine', 0)} quarantined), {summary['skipped']} skipped; {judged} judged in "
              f"{run['seconds']:.1f} s; results in {opts.out}", file=sys.stderr)  # fmt: skip
        if interrupted:
            print("filmgate sweep: INTERRUPTED: run the same command again to resume", file=sys.stderr)
            return INTERRUPTED
        if not complete:
            print(f"filmgate sweep: {films - done} films found could not be judged (see the warnings above); run the "
                  "same command again to retry them", file=sys.stderr)  # fmt: skip
            return 1
        return 0
    finally:
        store.close()


def _chain(*its: Iterable[Any]) -> Iterator[Any]:
    for it in its:
        yield from it


def _drive(store: Store, executor: Executor, fp: str, items_fn: Callable[[Callable[[str], bool]], Iterable[Item]],
           films: int, done: int, opts: SweepOptions) -> tuple[int, bool]:  # fmt: skip
    """Judge the pending films; returns (films judged, whether it was interrupted)."""
    stop = {"asked": False}

    def on_signal(signum: int, frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        executor.request_stop()
        print("\nfilmgate sweep: stopping after the batches in flight (Ctrl-C again to abort)", file=sys.stderr)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = _Progress(films, done, opts.progress)
    judged = 0
    keep = _sampler(films, opts.accepted_sample)
    on_rows = _placer(store, opts)
    try:
        for batch, batch_fp, rows in executor.run(_batched(items_fn(keep), opts.batch)):
            if batch_fp != fp:
                raise RuntimeError(f"a worker judged with another judge ({batch_fp!r}, expected {fp!r}): every "
                                   "worker must run the same filmgate, models and configuration")  # fmt: skip
            on_rows(batch, rows)
            store.put(rows, fp)
            judged += len(rows)
            bar.update(len(rows))
    finally:
        bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return judged, stop["asked"]


def _placer(store: Store, opts: SweepOptions) -> Callable[[list[Item], list[Row]], None]:
    """Films received from a PACS exist only in memory: with --sort-into they are written into the tree as they
    are judged (and the store remembers where); otherwise their bytes are dropped."""
    root = opts.sort_into
    if root is None:
        return lambda batch, rows: None

    def write(batch: list[Item], rows: list[Row]) -> None:
        for item, row in zip(batch, rows, strict=True):
            if item.data is not None:
                dst = sort.target(root, row.values["decision"], row.values["reasons"], item.path)
                sort.write_bytes(item.data, dst)
                store.set_abspath(item.key, str(dst))

    return write
