"""The test suite's own setup, run as a user runs it: without the shared films it stops at once and says where it
looked, instead of failing test by test as if the models had regressed."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import REPO


def test_the_suite_stops_at_once_without_the_shared_films(tmp_path):
    env = {**os.environ, "FILMGATE_DATA": str(tmp_path / "no-data")}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/detectors/test_config_checks.py"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 4, proc.stdout[-2000:] + proc.stderr[-2000:]  # pytest's usage error, no test run
    assert f"test data not found at {tmp_path / 'no-data'}" in proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "failed" not in proc.stdout
