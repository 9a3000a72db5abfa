"""The real films with a known outcome (``evaluate.checks``) that each shipped detector's config names, judged by the
shipped model as the gate runs it: a row found wrong in the data (a film stored upside down, say) stays caught."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from filmgate.manifest import load_manifest
from filmgate_training.config import load_config
from filmgate_training.evaluate import check_films, onnx_runner
from filmgate_training.tasks import get_task
from tests.helpers import MODELS, REPO

CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))


def shipped_configs() -> list[Path]:
    """The configs whose version is the one shipped under models/ (the config each shipped model was built from)."""
    found = []
    for path in CONFIGS:
        config = load_config(path)
        manifest = MODELS / config.task / "manifest.json"
        if manifest.is_file() and load_manifest(manifest.parent).version == config.version:
            found.append(path)
    return found


def test_every_shipped_detector_has_its_config():
    tasks = {load_config(p).task for p in shipped_configs()}
    assert {"orientation", "inversion", "flip", "view", "pediatric", "atypical"} <= tasks


@pytest.mark.parametrize("path", [p for p in shipped_configs() if load_config(p).evaluate.checks], ids=lambda p: p.stem)
def test_the_shipped_model_judges_its_config_checks_as_declared(path):
    config = load_config(path)
    task = get_task(config.task)
    manifest = load_manifest(MODELS / config.task)
    runner = onnx_runner(MODELS / config.task / manifest.file, threads=1)
    config = dataclasses.replace(config, preprocessing=manifest.preprocessing)  # as the gate feeds it
    wrong = [c for c in check_films(config, task, runner, manifest.threshold) if not c.get("ok")]
    assert wrong == [], wrong
