"""The long run of the fault and fuzz harness (tests/fault_harness.py): thousands of mutated and hostile datasets,
network attacks and ``kill -9`` of the whole node (its process group) in the middle of sending, cycle after cycle,
then the same accounting as the CI test: every acknowledged instance exactly once at each destination of its route
(or its dead letter), byte for byte; nothing left in the spool; C-ECHO answers; memory under the limit.

Run as root from the repository root (it mounts a tmpfs in a mount namespace)::

    FILMGATE_DATA=../shared/data .venv/bin/python bench/fault_soak.py --cases 3000 --cycles 50

It prints its figures as one JSON object (docs/OPERATIONS.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from filmgate_training.datasets import select  # noqa: E402
from tests.fault_harness import Harness, echo, idle_connections  # noqa: E402


def adult_films(n: int) -> list[Path]:
    frontal = [f for f in select(split="val", kind="frontal-chest") if f.pediatric == "no"]
    by_source: dict[str, list[Path]] = {}
    for f in frontal:
        by_source.setdefault(f.source, []).append(f.path)
    out = [p for paths in by_source.values() for p in paths[:2]]
    return out[:n]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=3000, help="mutated datasets in all (hostile ones come on top)")
    ap.add_argument("--cycles", type=int, default=50, help="kill -9 cycles of the whole node")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="/tmp/filmgate-fault-soak", help="working folder (emptied first)")
    ap.add_argument("--memory-limit-mib", type=int, default=2048)
    args = ap.parse_args()
    import shutil
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped: still unmount and kill the node (finally)

    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    rng = random.Random(args.seed)
    h = Harness(root, films=adult_films(6), spool_mb=256, memory_limit=args.memory_limit_mib << 20)
    # A sender whose node was killed under it notices only at its DIMSE timeout; 10 s keeps the cycles short.
    h.ledger.answer_timeout = 10.0
    t0 = time.monotonic()
    kills = 0
    try:
        h.start()
        per_cycle = max(1, args.cases // max(1, args.cycles))
        for cycle in range(args.cycles):
            port = h.node.dicom_port
            idle = idle_connections(port, 20)
            h.network_attacks(rng, bombs=1, junk=3, flood=20)
            sender = threading.Thread(target=h.datasets, args=(per_cycle, args.seed * 1000 + cycle))
            sender.start()
            time.sleep(rng.uniform(0.5, 3.0))  # a random moment in the middle of sending: then kill -9
            h.node.kill9()
            kills += 1
            sender.join()
            for s in idle:
                s.close()
            h.node.start()
            if cycle % 10 == 5:
                h.pacs_outage(3.0)
            print(f"cycle {cycle + 1}/{args.cycles}: {sum(h.ledger.acked.values())} acknowledged so far",
                  file=sys.stderr)  # fmt: skip
        h.datasets(per_cycle, args.seed * 1000 + args.cycles)  # and a last batch with nobody killing the node
        h.valid(10, seed=args.seed)
        h.drain(900)
        assert echo(h.node.dicom_port), "C-ECHO after the run"
        figures = h.account(exact=False)
        assert h.node.peak_rss < h.memory_limit, f"memory peaked at {h.node.peak_rss >> 20} MiB"
        figures.update(
            cases_sent=sum(v for k, v in h.ledger.answers.items()), answers={str(k): v for k, v in
                                                                             h.ledger.answers.items()},
            kill9_cycles=kills, peak_rss_mib=h.node.peak_rss >> 20, memory_limit_mib=args.memory_limit_mib,
            seconds=round(time.monotonic() - t0), events=dict(h.events),
            unanswered_for_the_whole_timeout=sum(1 for _, seconds, _ in h.ledger.silent if seconds >= 9.9),
            command=" ".join(["bench/fault_soak.py", *sys.argv[1:]]),
        )  # fmt: skip
        print(json.dumps(figures, indent=1))
        h.node.stop()
    finally:
        h.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
