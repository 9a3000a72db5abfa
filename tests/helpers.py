"""Helpers shared by every test area (imported from here, never from a conftest file).

- :func:`free_port`, :func:`wait_for`: loopback ports chosen by the OS; waiting for a condition with a deadline (the
  one way a test waits: no sleeps as synchronisation).
- :class:`ShippedDetector`: one shipped model judged by the gate's own judge (:mod:`filmgate.judge`), for the tests
  that check one detector's figures.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from filmgate.config import parse_config
from filmgate.detectors import DetectorSet, load_detector
from filmgate.judge import Judge
from filmgate.manifest import Finding, ModelManifest, load_manifest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS chose it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1, *, tolerate: bool = False
) -> T:
    """Poll ``predicate`` until it returns a truthy value (returned); an AssertionError naming ``what`` after
    ``timeout`` seconds. With ``tolerate`` an exception counts as "not yet" (a server refusing while it starts) and
    the last one is named in the failure."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:
            if not tolerate:
                raise
            last = exc
        if time.monotonic() >= deadline:
            why = f" (last error: {last!r})" if last else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{why}")
        time.sleep(interval)


class ShippedDetector:
    """One shipped model (``models/<name>``), judged as the gate judges: ``Judge.examine_pixels`` (the gate's
    preprocessing) then ``Judge.conclude`` (onnxruntime on CPU through the one session factory)."""

    def __init__(self, name: str, models: Path = MODELS, threads: int = 2) -> None:
        self.folder = models / name
        assert (self.folder / "manifest.json").is_file(), f"models/{name} is not shipped"
        self.manifest: ModelManifest = load_manifest(self.folder)  # schema + sha256, as the gate loads it
        cfg = parse_config({"detectors": {"models_dir": str(models), "provider": "cpu", "intra_op_threads": threads}})
        self.judge = Judge(cfg, DetectorSet([load_detector(self.folder, self.manifest, cfg.detectors)]))

    def findings(self, images: Sequence[np.ndarray], batch: int = 64) -> list[Finding]:
        """This detector's finding on each decoded film (threshold: the manifest's)."""
        out: list[Finding] = []
        for i in range(0, len(images), batch):
            examined = [self.judge.examine_pixels(p) for p in images[i : i + batch]]
            out += [j.findings[0] for j in self.judge.conclude(examined)]
        return out

    def scores(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return np.array([f.score for f in self.findings(images)], dtype=np.float64)

    def flagged(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.scores(images) >= self.manifest.threshold

