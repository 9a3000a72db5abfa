"""The decision index at the size of a site's history: what recording costs per film, and whether the console's pages
stay fast at tens of thousands of films.

    .venv/bin/python bench/review_index.py [--rows 50000]

Builds an index of ``--rows`` decided instances (six detectors' findings, reasons, a 20 kB thumbnail each for the
newest 2,000) in a temporary folder, then times:

* recording one decided instance (``record_instance``, as the pipeline does), against decoding one real film with
  the gate's decoder, measured in the same run: the index's share of the per-film work;
* the console's queries (first page, last page, a reason filter, a score filter, the studies page) at ``--rows``,
  against the first page of a 1,000-row index built in the same run: how paging scales with the history.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filmgate.decode import decode_file  # noqa: E402
from filmgate.index import DecisionIndex, Query  # noqa: E402
from filmgate_training.datasets import select  # noqa: E402

DETECTORS = ("atypical", "flip", "inversion", "orientation", "pediatric", "view")
REASONS = ("rotated", "inverted", "flipped", "not-frontal-chest", "pediatric", "atypical", "modality")


def record(i: int, rng: random.Random) -> dict:
    quarantined = rng.random() < 0.08
    reasons = rng.sample(REASONS, rng.randint(1, 2)) if quarantined else []
    scores = {d: round(rng.random() if quarantined else rng.random() * 0.2, 6) for d in DETECTORS}
    return {
        "sop_instance_uid": f"1.2.826.0.1.3680043.8.498.{i}", "study_instance_uid": f"1.2.3.{i // 3}",
        "series_instance_uid": f"1.2.3.{i // 3}.1", "sop_class_uid": "1.2.840.10008.5.1.4.1.1.1.1", "modality": "DX",
        "calling_ae": f"CR{i % 7:02d}", "decision": "quarantine" if quarantined else "accept", "reasons": reasons,
        "scores": scores,
        "findings": [{"detector": d, "reason": d, "score": s, "threshold": 0.5, "flagged": s > 0.5, "model": d,
                      "version": "1.1.0"} for d, s in scores.items()],  # fmt: skip
        "models": [{"name": d, "version": "1.1.0"} for d in DETECTORS],
        "header": {"Modality": "DX", "ViewPosition": "PA", "BodyPartExamined": "CHEST", "PatientAge": "045Y"},
        "kept_path": f"/var/spool/state/kept/20260101/{i:023d}.dcm" if quarantined else "",
    }  # fmt: skip


def build(path: Path, rows: int, thumbs: int) -> DecisionIndex:
    index = DecisionIndex(path)
    rng = random.Random(0)
    blob = bytes(rng.getrandbits(8) for _ in range(20_000))
    t0 = 1.7e9
    for i in range(rows):
        index.record_instance(f"{i:023d}.dcm", record(i, rng), received_at=t0 + i * 2.0,
                              thumbnail=blob if i >= rows - thumbs else None)  # fmt: skip
    return index


def timed(fn, runs: int = 15) -> float:
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        big = build(Path(tmp) / "big.sqlite", args.rows, min(2000, args.rows))
        build_s = time.perf_counter() - t
        small = build(Path(tmp) / "small.sqlite", 1000, 0)
        rng = random.Random(1)
        n = [args.rows]

        def one_write() -> None:
            n[0] += 1
            big.record_instance(f"{n[0]:023d}.dcm", record(n[0], rng), received_at=1.9e9 + n[0])

        write = timed(one_write, 200)
        film = next(f for f in select(split="val", kind="frontal-chest") if f.path.suffix.lower() == ".png")
        decode = timed(lambda: decode_file(film.path), 15)
        base = timed(lambda: small.query(Query(limit=48)))
        queries = {
            "first page (48)": Query(limit=48),
            "last page": Query(limit=48, offset=args.rows - 48),
            "reason=rotated, page 1": Query(reason="rotated", limit=48),
            "quarantine, pending, page 1": Query(outcome="quarantine", review_state="pending", limit=48),
            "orientation score >= 0.9": Query(detector="orientation", min_score=0.9, limit=48),
        }
        print(f"index of {args.rows} instances built in {build_s:.1f} s ({build_s / args.rows * 1e3:.2f} ms each)")
        print(f"record one decided instance: {write * 1e3:.2f} ms; decode one real film ({film.path.name}): "
              f"{decode * 1e3:.2f} ms; ratio {write / decode:.3f}")  # fmt: skip
        print(f"baseline: first page of a 1,000-row index {base * 1e3:.2f} ms")
        for name, q in queries.items():
            s = timed(lambda q=q: big.query(q))
            print(f"{name:32s} {s * 1e3:8.2f} ms   ratio to baseline {s / base:6.1f}")
        s = timed(lambda: big.studies(48, 0), 5)
        print(f"{'studies page (48)':32s} {s * 1e3:8.2f} ms   ratio to baseline {s / base:6.1f}")
        big.close()
        small.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
