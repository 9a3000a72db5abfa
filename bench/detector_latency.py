"""CPU latency of the shipped detectors at batch 1 and batch 16 with one thread (onnxruntime, as the gate runs them).

    .venv/bin/python bench/detector_latency.py [--models orientation inversion] [--threads 1] [--seconds 2]

Inputs are real val films through filmgate.decode + filmgate.preprocess. Besides milliseconds, it prints ratios against
baselines measured in the same run on the same machine, so figures compare across machines: detector time per film
over the time to decode one real film (the gate's unavoidable per-film cost), and batch-16 per-film time over batch-1.
The goal (issue 3): orientation + inversion together under 15 ms per film at batch 1 on one core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filmgate.decode import decode_file  # noqa: E402
from filmgate.manifest import load_manifest  # noqa: E402
from filmgate.preprocess import preprocess  # noqa: E402
from filmgate_training.datasets import select  # noqa: E402

GOAL_MS = 15.0


def timeit(fn, seconds: float, min_runs: int = 20) -> list[float]:
    for _ in range(5):
        fn()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < min_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    from filmgate.detectors import onnx_session

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["orientation", "inversion"])
    parser.add_argument("--models-dir", default=str(ROOT / "models"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=2.0, help="timing per measurement")
    args = parser.parse_args()

    films = select(split="val", kind="frontal-chest", source="nih-cxr14")[:16]
    decode_ms = 1000 * statistics.median(timeit(lambda: decode_file(films[0].path), args.seconds))
    decoded = [decode_file(f.path).pixels for f in films]
    print(f"baseline: decode one real film (nih-cxr14, {decoded[0].shape[1]}x{decoded[0].shape[0]}): "
          f"{decode_ms:.2f} ms")  # fmt: skip
    total_b1 = total_min = 0.0
    for name in args.models:
        folder = Path(args.models_dir) / name
        manifest = load_manifest(folder)
        session = onnx_session(folder / manifest.file, provider="cpu", intra_op_threads=args.threads)
        batch = np.stack([preprocess(p, manifest.preprocessing) for p in decoded]).astype(np.float32)
        prep_ms = 1000 * statistics.median(timeit(lambda m=manifest: preprocess(decoded[0], m.preprocessing), 0.5))
        one = batch[:1]
        b1 = timeit(lambda s=session, x=one: s.run(None, {"image": x}), args.seconds)
        b16 = timeit(lambda s=session, x=batch: s.run(None, {"image": x}), args.seconds)
        b1_ms = 1000 * statistics.median(b1)
        b16_ms = 1000 * statistics.median(b16) / len(batch)
        p90 = 1000 * float(np.percentile(b1, 90))
        b1_min = 1000 * min(b1)
        b16_min = 1000 * min(b16) / len(batch)
        total_b1 += b1_ms
        total_min += b1_min
        print(
            f"{name:12s} {manifest.preprocessing.size}px  batch 1: median {b1_ms:6.2f} ms/film (min {b1_min:.2f}, "
            f"p90 {p90:.2f})  batch 16: median {b16_ms:6.2f} ms/film (min {b16_min:.2f})  "
            f"b16/b1 {b16_ms / b1_ms:.2f}  vs decode {b1_ms / decode_ms:.2f}x  preprocess {prep_ms:.2f} ms  "
            f"[{args.threads} thread]"
        )
    print(f"together at batch 1: median {total_b1:.2f} ms/film (min {total_min:.2f}) = {total_b1 / GOAL_MS:.2f} of "
          f"the {GOAL_MS:g} ms goal; {total_b1 / decode_ms:.2f}x the decode of one film")  # fmt: skip
    print("(min is the best run: close to the cost on an idle core when other processes share the machine)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
