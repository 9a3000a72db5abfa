"""int8 static quantisation of the shipped detectors, measured against the float models in the same run.

    .venv/bin/python bench/detector_int8.py [--models flip view] [--calibration 64] [--films 200] [--seconds 2]

For each detector: onnxruntime's static quantisation (QDQ, per-channel weights, calibrated on *train* frontal films
through the gate's decode + preprocess), then on one thread at batch 1 the float and int8 milliseconds per film and
their ratio, and on val films how often the int8 model's verdict (score >= the manifest threshold) differs from the
float model's and the largest score difference. A measurement for the speed issue, not a shipped model: a quantised
detector would need its own val and leave-one-source-out figures before it could replace one.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filmgate.decode import decode_file  # noqa: E402
from filmgate.detectors import onnx_session  # noqa: E402
from filmgate.manifest import load_manifest  # noqa: E402
from filmgate.preprocess import preprocess_batch  # noqa: E402
from filmgate_training.datasets import select  # noqa: E402

NAMES = ("orientation", "inversion", "flip", "view", "pediatric", "atypical")


def films(split: str, n: int) -> list[np.ndarray]:
    rows = sorted(select(split=split, kind="frontal-chest"), key=lambda f: str(f.path))
    return [decode_file(f.path).pixels for f in rows[:: max(1, len(rows) // n)][:n]]


def ms_per_film(session, x: np.ndarray, seconds: float) -> float:
    name = session.get_inputs()[0].name
    for i in range(5):
        session.run(None, {name: x[i % len(x)][None]})
    times, start, i = [], time.perf_counter(), 0
    while time.perf_counter() - start < seconds or len(times) < 20:
        t0 = time.perf_counter()
        session.run(None, {name: x[i % len(x)][None]})
        times.append(time.perf_counter() - t0)
        i += 1
    return 1000 * statistics.median(times)


def quantise(model: Path, calibration: np.ndarray, out: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"image": calibration[i : i + 1]} for i in range(len(calibration))])

        def get_next(self):  # noqa: ANN201 (onnxruntime's interface)
            return next(self.items, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=list(NAMES))
    ap.add_argument("--calibration", type=int, default=64, help="train films to calibrate on")
    ap.add_argument("--films", type=int, default=200, help="val films to compare verdicts on")
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    train, val = films("train", args.calibration), films("val", args.films)
    total = {"float": 0.0, "int8": 0.0}
    print("| detector | float ms/film | int8 ms/film | int8/float | verdicts changed (val) | max score diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            m = load_manifest(ROOT / "models" / name)
            src = ROOT / "models" / name / m.file
            cal = preprocess_batch(train, m.preprocessing)
            x = preprocess_batch(val, m.preprocessing)
            q = Path(tmp) / f"{name}.int8.onnx"
            quantise(src, cal, q)
            fs, qs = onnx_session(src, intra_op_threads=1), onnx_session(q, intra_op_threads=1)
            a, b = m.scores(fs.run(None, {m.input_name: x})[0]), m.scores(qs.run(None, {m.input_name: x})[0])
            changed = int(((a >= m.threshold) != (b >= m.threshold)).sum())
            tf, tq = ms_per_film(fs, x, args.seconds), ms_per_film(qs, x, args.seconds)
            total["float"] += tf
            total["int8"] += tq
            print(f"| {name} | {tf:.2f} | {tq:.2f} | {tq / tf:.2f} | {changed}/{len(x)} | {np.abs(a - b).max():.4f} |")
    print(f"| all | {total['float']:.2f} | {total['int8']:.2f} | {total['int8'] / total['float']:.2f} | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
