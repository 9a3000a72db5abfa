"""CPU latency of the shipped detectors, float32 (old) against int8 (new, ``manifest.quantized``), in the same run.

    .venv/bin/python bench/detector_latency.py [--models orientation inversion] [--threads 1] [--seconds 2]

One onnxruntime thread per model (``intra_op_num_threads``, as the gate runs them), batch 1 and batch 16, sessions
from the gate's one factory. Inputs are real val films through filmgate.decode + filmgate.preprocess. The two
models of a detector are timed alternately, call by call, so both see the same load on a shared machine; the ratio
int8/fp32 of each detector and of all together is the figure to compare across machines, with the time to decode one
real film (the gate's unavoidable per-film cost) as a second baseline. The goal (issue 15): all detectors together
<= 3 ms per film on one core at batch 1.
"""

from __future__ import annotations

import argparse
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
ALL = ["orientation", "inversion", "flip", "view", "pediatric", "atypical"]


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


def main() -> int:
    from filmgate.detectors import onnx_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=ALL)
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement and model")
    args = parser.parse_args()

    films = select(split="val", kind="frontal-chest", source="nih-cxr14")[:16]
    decode_ms = 1000 * statistics.median(timeit(lambda: decode_file(films[0].path), args.seconds))
    decoded = [decode_file(f.path).pixels for f in films]
    print(f"baseline: decode one real film (nih-cxr14, {decoded[0].shape[1]}x{decoded[0].shape[0]}): "
          f"{decode_ms:.2f} ms")  # fmt: skip
    total = {"fp32": 0.0, "int8": 0.0}
    best = {"fp32": 0.0, "int8": 0.0}
    cpu_total = {"fp32": 0.0, "int8": 0.0}
    for name in args.models:
        folder = Path(args.models_dir) / name
        manifest = load_manifest(folder)
        files = {"fp32": manifest.file} | ({"int8": manifest.quantized.file} if manifest.quantized else {})
        sessions = {p: onnx_session(folder / f, provider="cpu", intra_op_threads=args.threads)
                    for p, f in files.items()}  # fmt: skip
        batch = np.stack([preprocess(p, manifest.preprocessing) for p in decoded]).astype(np.float32)
        one = batch[:1]
        t1, c1 = paired([lambda s=s, x=one: s.run(None, {"image": x}) for s in sessions.values()], args.seconds)
        t16, _ = paired([lambda s=s, x=batch: s.run(None, {"image": x}) for s in sessions.values()], args.seconds)
        b1, b16 = dict(zip(sessions, t1, strict=True)), dict(zip(sessions, t16, strict=True))
        cpu_ms = {p: 1000 * c for p, c in zip(sessions, c1, strict=True)}
        med = {p: 1000 * statistics.median(t) for p, t in b1.items()}
        low = {p: 1000 * min(t) for p, t in b1.items()}
        m16 = {p: 1000 * statistics.median(t) / len(batch) for p, t in b16.items()}
        for p in total:
            total[p] += med.get(p, med["fp32"])  # a detector without an int8 model runs its float one
            best[p] += low.get(p, low["fp32"])
            cpu_total[p] += cpu_ms.get(p, cpu_ms["fp32"])
        new = "int8" if "int8" in med else "fp32"
        print(
            f"{name:12s} {manifest.preprocessing.size}px batch 1: fp32 {med['fp32']:5.2f} ms/film (min "
            f"{low['fp32']:.2f}), {new} {med[new]:5.2f} (min {low[new]:.2f}), {new}/fp32 {med[new] / med['fp32']:.2f}"
            f"  CPU fp32 {cpu_ms['fp32']:.2f}, {new} {cpu_ms[new]:.2f} ms/film  batch 16: fp32 {m16['fp32']:5.2f}, "
            f"{new} {m16[new]:5.2f} ms/film  [{args.threads} thread]"
        )
    ratio = total["int8"] / total["fp32"]
    print(f"all {len(args.models)} at batch 1, median ms/film: old (fp32) {total['fp32']:.2f}, new (int8) "
          f"{total['int8']:.2f}, new/old {ratio:.2f}; new = {total['int8'] / GOAL_MS:.2f} of the {GOAL_MS:g} ms goal, "
          f"{total['int8'] / decode_ms:.2f}x the decode of one film")  # fmt: skip
    print(f"best runs (min, close to an idle core on a shared machine): old {best['fp32']:.2f}, new "
          f"{best['int8']:.2f} ms/film, new/old {best['int8'] / best['fp32']:.2f}")  # fmt: skip
    old, new = cpu_total["fp32"], cpu_total["int8"]
    print(f"CPU time (mean, this thread): old {old:.2f}, new {new:.2f} ms/film, new/old {new / old:.2f}; new = "
          f"{new / GOAL_MS:.2f} of the goal")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
