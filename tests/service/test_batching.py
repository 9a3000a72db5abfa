"""Films that wait together are run through the detectors together, and batching does not change a score."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, Gate, storescu


def test_waiting_films_are_batched_with_the_same_scores(tmp_path, made_films, models_dir):
    films = [f for f in made_films if f.note.startswith(("normal", "rot", "inverted", "mono1"))][:8]
    gate = Gate.create(
        tmp_path, workers={"processes": 1, "decode_threads": 2, "max_batch": 8, "batch_wait_ms": 400.0}
    ).start()
    try:
        assert storescu([f.path for f in films], gate.dicom_port) == []
        records = {r["sop_instance_uid"]: r for r in gate.wait_delivered(len(films), timeout=120)}
    finally:
        assert gate.stop() == 0
    assert max(r["timings_ms"]["batch"] for r in records.values()) > 1, "several waiting films form one batch"
    proc = subprocess.run(
        [sys.executable, "-m", "filmgate.cli", "inspect", *[str(f.path) for f in films]],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"FILMGATE_CONFIG": str(gate.config_path), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for film, line in zip(films, proc.stdout.splitlines(), strict=True):
        alone = json.loads(line)["scores"]
        batched = records[film.uid]["scores"]
        assert batched.keys() == alone.keys()
        for name in alone:
            assert batched[name] == pytest.approx(alone[name], abs=1e-4), (film.note, name)


def test_shared_resize_gives_exactly_the_training_tensor(made_films, models_dir):
    """The gate resizes once per (size, resize) and normalises per model; that must equal preprocess() per spec."""
    import numpy as np

    from filmgate.config import DetectorsConfig
    from filmgate.decode import decode_file
    from filmgate.detectors import DetectorSet
    from filmgate.preprocess import preprocess

    detectors = DetectorSet.load(DetectorsConfig(models_dir=str(models_dir)))
    pixels = decode_file(made_films[0].path).pixels
    prepared = detectors.prepare(pixels)
    assert set(prepared) == {d.manifest.preprocessing for d in detectors.detectors}
    for spec, tensor in prepared.items():
        assert np.array_equal(tensor, preprocess(pixels, spec)), spec
