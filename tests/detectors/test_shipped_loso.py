"""The shipped detectors reach their leave-one-source-out figures (manifest ``metrics.loso``, written by
``python -m filmgate_training loso --card``) on a fixed subset of a hospital each never trained on.

For every ``unseen`` row (the shipped model itself on a source its manifest's training data does not name) a fixed
subset of that source's films (evenly spaced in path order) is run as the gate runs it; its false-flag and catch
counts must be what the full figure allows: within the 95% Wilson interval of the manifest's rate widened by one film.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from filmgate.manifest import load_manifest
from filmgate_training import loso
from filmgate_training.config import load_config
from filmgate_training.tasks import get_task
from tests.helpers import MODELS, ShippedDetector, pixels

SUBSET = 30  # films per held-out source
CONFIGS = {"orientation": "orientation", "inversion": "inversion", "flip": "flip-small-hr", "view": "view-ft",
           "pediatric": "pediatric-adults"}  # fmt: skip


def unseen_rows(name: str) -> list[tuple[str, dict]]:
    metrics = load_manifest(MODELS / name).metrics.get("loso", {})
    return [(key.split(" (")[0], row) for key, row in sorted(metrics.items()) if key.endswith("(unseen)")]


CASES = [(name, source, row) for name in CONFIGS for source, row in unseen_rows(name)[:2]]


def test_every_classifier_card_has_leave_one_source_out_figures():
    for name in CONFIGS:
        card = (MODELS / name / "MODEL_CARD.md").read_text()
        assert loso.CARD_BEGIN in card, f"models/{name}: no leave-one-source-out section"
        assert unseen_rows(name), f"models/{name}: no leave-one-source-out rows in the manifest"
        trained = {r["source"] for r in load_manifest(MODELS / name).training_data}
        assert all(source not in trained for source, _ in unseen_rows(name))  # the card's claim: never trained on


@pytest.mark.parametrize(("name", "source", "row"), CASES, ids=[f"{n}-{s}" for n, s, _ in CASES])
def test_shipped_model_reaches_its_leave_one_source_out_figures_on_a_fixed_subset(name, source, row):
    det = ShippedDetector(name)
    config = load_config(CONFIGS[name])
    task = get_task(config.task).for_held_out()
    films = loso.held_out_films(config, task, source)
    films = films[:: max(1, len(films) // SUBSET)][:SUBSET]
    labels, images = [], []
    for film in films:
        px = pixels(film)
        for ex in task.eval_examples(px, film):
            labels.append(ex.label)
            images.append(np.ascontiguousarray(ex.pixels))
    flagged = det.flagged(images)
    negative = np.array([not task.is_positive(int(y)) for y in labels])
    for key, mask in (("false_flags", negative), ("caught", ~negative)):
        if key not in row or not mask.any():
            continue
        n, k = int(mask.sum()), int(flagged[mask].sum())
        lo, hi = row[key]["ci95"]
        assert math.floor(lo * n) - 1 <= k <= math.ceil(hi * n) + 1, (
            f"{name} on {source}: {key} {k}/{n} here, manifest {row[key]['flagged']}/{row[key]['of']}"
        )
