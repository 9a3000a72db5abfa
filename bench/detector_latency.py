"""CPU latency of the six detectors: the previous per-detector files (old) against what the gate runs now (new).

    .venv/bin/python bench/detector_latency.py [--models-dir models] [--threads 1] [--seconds 2] [--precision auto]

old: every detector's own model file in its own session, as the gate ran them before shared graphs (on CPU the int8
copy a manifest names, ``--precision fp32`` the float models). new: the gate's own ``DetectorSet`` as it loads
``models/`` now: one ``session.run`` per distinct session, a graph shared by several detectors (``manifest.graph``:
view and atypical) run once for all of them. One onnxruntime thread per session (``intra_op_num_threads``, as the
gate runs them), batch 1 and batch 16, sessions from the gate's one factory; inputs are real val films through the
gate's decode and preprocessing. old and new are timed alternately, call by call, so both see the same load on a
shared machine: new/old is the figure to compare across machines, with the time to decode one real film (the gate's
unavoidable per-film cost) as a second baseline. The goal (issue 15): all detectors together <= 3 ms per film on one
core at batch 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filmgate.decode import decode_file  # noqa: E402
from filmgate.manifest import load_manifest  # noqa: E402
from filmgate.preprocess import preprocess  # noqa: E402
from filmgate_training.datasets import select  # noqa: E402

GOAL_MS = 3.0


def timeit(fn: Callable[[], object], seconds: float, min_runs: int = 20) -> list[float]:
    for _ in range(5):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def paired(
    fns: list[Callable[[], object]], seconds: float, min_runs: int = 20
) -> tuple[list[list[float]], list[float]]:
    """Each function's call times, the functions called in turn (the same load for each), and each one's CPU time
    per call (this thread's: with one intra-op thread onnxruntime computes in the calling thread), which other
    processes on a shared machine inflate far less than the wall time."""
    for fn in fns:
        for _ in range(5):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    cpu = [0.0 for _ in fns]
    start = time.perf_counter()
    while time.perf_counter() - start < seconds * len(fns) or len(times[0]) < min_runs:
        for i, (fn, out) in enumerate(zip(fns, times, strict=True)):
            c0, t0 = time.thread_time(), time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            cpu[i] += time.thread_time() - c0
    return times, [c / len(times[0]) for c in cpu]


def old_runs(models_dir: Path, names: list[str], decoded: list[np.ndarray], threads: int, precision: str
             ) -> dict[str, tuple[Callable[[], object], Callable[[], object], str]]:  # fmt: skip
    """Per detector: (batch-1 call, batch-16 call, file) of its own model file in its own session."""
    from filmgate.detectors import onnx_session

    out = {}
    for name in names:
        folder = models_dir / name
        manifest = load_manifest(folder)
        file, _ = manifest.file_for("CPUExecutionProvider", precision)
        s = onnx_session(folder / file, provider="cpu", intra_op_threads=threads)
        batch = np.stack([preprocess(p, manifest.preprocessing) for p in decoded]).astype(np.float32)
        feed = manifest.input_name
        out[name] = (lambda s=s, x=batch[:1], f=feed: s.run(None, {f: x}),
                     lambda s=s, x=batch, f=feed: s.run(None, {f: x}), file)  # fmt: skip
    return out


def new_runs(models_dir: Path, names: list[str], decoded: list[np.ndarray], threads: int, precision: str
             ) -> list[tuple[list[str], Callable[[], object], Callable[[], object], str]]:  # fmt: skip
    """Per session of the gate's DetectorSet: (its detectors, batch-1 call, batch-16 call, file), fed as
    ``DetectorSet.run`` feeds it."""
    from filmgate.config import parse_config
    from filmgate.detectors import DetectorSet

    disabled = [m.name for m in (load_manifest(p.parent) for p in sorted(models_dir.glob("*/manifest.json")))
                if m.name not in names]  # fmt: skip
    cfg = parse_config({"detectors": {"models_dir": str(models_dir), "provider": "cpu", "intra_op_threads": threads,
                                      "precision": precision, "disabled": disabled}})  # fmt: skip
    dets = DetectorSet.load(cfg.detectors)
    prepared = [dets.prepare(p) for p in decoded]
    out = []
    for group in dets.sessions:
        first = group[0]
        feeds = {n: np.stack([item[s] for item in prepared]).astype(np.float32) for n, s in first.inputs.items()}
        one = {n: x[:1] for n, x in feeds.items()}
        outputs = [d.output_name for d in group]
        g = first.manifest.graph
        what = (g.file_for("CPUExecutionProvider", precision)[0] if first.graph and g is not None
                else f"{first.name}/{first.manifest.file_for('CPUExecutionProvider', precision)[0]}")  # fmt: skip
        out.append(([d.name for d in group], lambda s=first.session, f=one, o=outputs: s.run(o, f),
                     lambda s=first.session, f=feeds, o=outputs: s.run(o, f), what))  # fmt: skip
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", help="detectors to time (default: every one shipped)")
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement and session")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32"),
                        help="auto: the int8 models on CPU, as the gate runs them; fp32: the float models")
    args = parser.parse_args()
    models_dir = Path(args.models_dir)
    names = args.models or [load_manifest(p.parent).name for p in sorted(models_dir.glob("*/manifest.json"))]

    films = select(split="val", kind="frontal-chest", source="nih-cxr14")[:16]
    decode_ms = 1000 * statistics.median(timeit(lambda: decode_file(films[0].path), args.seconds))
    decoded = [decode_file(f.path).pixels for f in films]
    print(f"baseline: decode one real film (nih-cxr14, {decoded[0].shape[1]}x{decoded[0].shape[0]}): "
          f"{decode_ms:.2f} ms; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    old = old_runs(models_dir, names, decoded, args.threads, args.precision)
    new = new_runs(models_dir, names, decoded, args.threads, args.precision)

    # all of old against all of new, call by call: the headline
    old_all = [f[0] for f in old.values()]
    new_all = [g[1] for g in new]
    (t_old, t_new), (c_old, c_new) = paired([lambda: [f() for f in old_all], lambda: [f() for f in new_all]],
                                            args.seconds * 3)  # fmt: skip
    old16 = [f[1] for f in old.values()]
    new16 = [g[2] for g in new]
    (s_old, s_new), _ = paired([lambda: [f() for f in old16], lambda: [f() for f in new16]], args.seconds * 3)
    # each session alone, all in turn: where the time goes
    fns = [f[0] for f in old.values()] + [g[1] for g in new]
    each, each_cpu = paired(fns, args.seconds)
    ms = [1000 * statistics.median(t) for t in each]
    for i, (name, (_, _, file)) in enumerate(old.items()):
        print(f"old {name:12s} {file:40s} batch 1: {ms[i]:5.2f} ms (min {1000 * min(each[i]):.2f}, CPU "
              f"{1000 * each_cpu[i]:.2f})")  # fmt: skip
    for j, (members, _, _, what) in enumerate(new):
        i = len(old) + j
        print(f"new {'+'.join(members):24s} {what:35s} batch 1: {ms[i]:5.2f} ms (min {1000 * min(each[i]):.2f}, "
              f"CPU {1000 * each_cpu[i]:.2f})")  # fmt: skip
    med_old, med_new = 1000 * statistics.median(t_old), 1000 * statistics.median(t_new)
    low_old, low_new = 1000 * min(t_old), 1000 * min(t_new)
    b16_old, b16_new = (1000 * statistics.median(s_old) / len(decoded), 1000 * statistics.median(s_new) / len(decoded))
    print(f"all {len(names)} detectors ({args.precision}, {args.threads} thread), batch 1, median ms/film: old "
          f"({len(old)} sessions) {med_old:.2f}, new ({len(new)} sessions) {med_new:.2f}, new/old "
          f"{med_new / med_old:.2f}; new = {med_new / GOAL_MS:.2f} of the {GOAL_MS:g} ms goal, "
          f"{med_new / decode_ms:.2f}x the decode of one film")  # fmt: skip
    print(f"best runs (min, close to an idle core on a shared machine): old {low_old:.2f}, new {low_new:.2f} ms/film, "
          f"new/old {low_new / low_old:.2f}")  # fmt: skip
    print(f"CPU time (mean, this thread): old {1000 * c_old:.2f}, new {1000 * c_new:.2f} ms/film, new/old "
          f"{c_new / c_old:.2f}; new = {1000 * c_new / GOAL_MS:.2f} of the goal")  # fmt: skip
    print(f"batch 16, median ms/film: old {b16_old:.2f}, new {b16_new:.2f}, new/old {b16_new / b16_old:.2f}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
