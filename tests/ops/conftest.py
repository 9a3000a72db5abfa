"""Fixtures of the ops tests (their helpers are in tests/helpers.py, the one module tests import helpers from)."""

from __future__ import annotations

import subprocess
import time

import pytest

from tests.helpers import REPO, docker, docker_cli


def _engine_answers() -> bool:
    try:
        return subprocess.run([docker_cli(), "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="session")
def filmgate_image() -> str:
    """The CPU image and the Compose stack's Orthanc and Prometheus images, built once per test run by
    `scripts/build-image --stack` (which starts the engine when none runs and reuses the engine's layer cache: only
    what changed is rebuilt). Skipped, saying why, only where no Docker engine can start (not root and none running,
    or dockerd refusing to start, e.g. without the privileges it needs)."""
    t0 = time.monotonic()
    res = subprocess.run([str(REPO / "scripts" / "build-image"), "--stack"], capture_output=True, text=True,
                         timeout=1500, cwd=REPO)  # fmt: skip
    if res.returncode != 0:
        if not _engine_answers():
            log = REPO / "var" / "dockerd.log"
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-5:]) if log.exists() else ""
            pytest.skip(f"no Docker engine can start here ({res.stderr.strip().splitlines()[-1:]}); {tail}")
        pytest.fail(f"scripts/build-image failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}", pytrace=False)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", "filmgate:local").stdout.strip())
    print(f"\nfilmgate:local built by scripts/build-image in {time.monotonic() - t0:.0f} s, {size / 1e6:.0f} MB")
    return "filmgate:local"
