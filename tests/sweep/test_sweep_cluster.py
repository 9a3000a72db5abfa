"""``filmgate sweep --cluster``: the unit of work on a real Dask cluster (a scheduler and a worker command with two
worker processes, started as on a real cluster) gives the same rows as the local mode."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from tests.helpers import FILMGATE, Process, committed_rows, free_port, read_csv, run_sweep, wait_until


def test_cluster_mode_gives_the_rows_of_the_local_mode(film_tree, swept, tmp_path):
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = Process([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                         "--no-dashboard"], tmp_path / "scheduler.log")  # fmt: skip
    workers = None
    try:
        # As docs/OPERATIONS.md says to start them: non-daemonic, so each may run its decode child.
        env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}
        workers = Process([sys.executable, "-m", "dask", "worker", address, "--nworkers", "2", "--nthreads", "1",
                           "--no-dashboard", "--memory-limit", "4GiB"], tmp_path / "workers.log", env=env)  # fmt: skip

        def two_workers() -> bool:
            assert scheduler.alive(), scheduler.tail()
            with Client(address, timeout="5s") as client:
                return len(client.scheduler_info()["workers"]) == 2

        wait_until(two_workers, 90, f"two Dask workers:\n{workers.tail()}")
        out = tmp_path / "out"
        proc = run_sweep(film_tree["root"], "--out", out, "--cluster", address)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["run"]["cluster"] == address and summary["run"]["jobs"] == 2, proc.stderr
        assert read_csv(out / "results.csv") == swept["rows"]
        assert read_csv(out / "skipped.csv") == read_csv(swept["out"] / "skipped.csv")
        local = swept["summary"]
        assert {k: v for k, v in summary.items() if k != "run"} == {k: v for k, v in local.items() if k != "run"}

        # A worker killed in the middle of a sweep (as the OOM killer would) costs no film: Dask runs its batch again.
        out2 = tmp_path / "out2"
        argv = [FILMGATE, "sweep", str(film_tree["root"]), "--out", str(out2), "--cluster", address, "--batch", "2"]
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_until(lambda: committed_rows(out2) >= 4 or proc.poll() is not None, 120, "the first rows", interval=0.02)
        with Client(address, timeout="5s") as client:
            victim = next(iter(client.run(os.getpid).values()))
        assert proc.poll() is None and committed_rows(out2) < len(swept["rows"]), "the sweep ended before the kill"
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        verdicts = [(r["path"], r["decision"], r["reasons"]) for r in read_csv(out2 / "results.csv")]
        assert verdicts == [(r["path"], r["decision"], r["reasons"]) for r in swept["rows"]]
    finally:
        if workers is not None:
            workers.stop()
        scheduler.stop()
