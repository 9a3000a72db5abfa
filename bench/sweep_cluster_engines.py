#!/usr/bin/env python
"""Dask distributed against Ray for ``filmgate sweep --cluster``: the same unit of work
(:func:`filmgate.sweep.work.judge_batch`), the same 240 real films in batches of 16, a local cluster of two worker
processes with one thread each. Prints the start-up time (cluster up, every worker's models loaded) and films/s once
warm. Run once per engine, in the same session (ratios only: the machine is shared):

    .venv/bin/python bench/sweep_cluster_engines.py dask
    PYTHONPATH=/tmp/ray .venv/bin/python bench/sweep_cluster_engines.py ray   # pip install --target /tmp/ray ray

Ray is not a dependency of filmgate; install it aside to measure.
"""

import json
import sys
import time

from filmgate.config import load_config
from filmgate.sweep.work import Item, judge_batch, judge_for
from filmgate_training.datasets import select

cfg = load_config(None)
films = [f.path for f in select(split="val") if f.path.suffix in (".png", ".jpg")][:240]
batches = [[Item(str(f), str(f), str(f)) for f in films[i : i + 16]] for i in range(0, len(films), 16)]


def _load() -> None:
    judge_for(cfg)


def main() -> None:
    which = sys.argv[1]
    t0 = time.time()
    if which == "dask":
        from distributed import Client, LocalCluster
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
        client = Client(cluster)
        client.run(_load)  # every worker loads its models
        up = time.time() - t0
        list(client.gather(client.map(judge_batch, batches[:2], [cfg] * 2, pure=False)))  # warm: models loaded
        t1 = time.time()
        res = client.gather(client.map(judge_batch, batches, [cfg] * len(batches), pure=False))
        run = time.time() - t1
        client.close()
        cluster.close()
    else:
        import ray  # noqa: I001 - measured only, not a dependency
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        remote = ray.remote(num_cpus=1)(judge_batch)
        ray.get([remote.remote([], cfg) for _ in range(2)])  # both workers up, models loaded
        up = time.time() - t0
        ray.get([remote.remote(b, cfg) for b in batches[:2]])
        t1 = time.time()
        res = ray.get([remote.remote(b, cfg) for b in batches])
        run = time.time() - t1
        ray.shutdown()
    rows = sum(len(r[1]) for r in res)
    print(json.dumps({"engine": which, "startup_s": round(up, 2), "films": rows, "films_per_s": round(rows / run, 1)}))


if __name__ == "__main__":
    main()
