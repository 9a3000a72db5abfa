"""``view``: is this a frontal chest radiograph? frontal-chest, lateral-chest, other-radiograph, not-radiograph.

Labels come from ``labels.csv`` (``kind``). Everything but ``frontal-chest`` is positive (reason
``not-frontal-chest``; the predicted class goes into the sidecar). Only 23 lateral chest films are in the train split,
so they are shown far more often than their share (see :meth:`ViewTask.sample_weight`) and each time differently:
mirrored (a lateral may face either way), tilted, cropped, zoomed, re-windowed, with markers, as a low-resolution copy.
Frontal films are mirrored too, so that the view model does not care about the flip (that is the ``flip`` detector's
job) and a mirrored frontal film is not mistaken for something else.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.datasets import LabelledFilm
from training.augment import display_augment, film_augment
from training.config import AugmentConfig
from training.detectors.degrade import low_resolution_copy
from training.tasks import Example, LabelledTask, register

KINDS = ("frontal-chest", "lateral-chest", "other-radiograph", "not-radiograph")
# Share of training samples per class. Frontal films are the negatives that decide the false-positive rate, so they
# keep the largest share; the rare lateral class gets a quarter on its own.
CLASS_SHARE = {"frontal-chest": 0.4, "lateral-chest": 0.2, "other-radiograph": 0.25, "not-radiograph": 0.15}


def _kind(film: LabelledFilm) -> str | None:
    return film.kind if film.kind in KINDS else None


@dataclass(frozen=True)
class ViewTask(LabelledTask):
    p_mirror: float = 0.5
    p_low_res: float = 0.15

    def class_share(self) -> dict[str, float]:
        """Target share of each label among training samples (the sampler weights films to reach it)."""
        return dict(CLASS_SHARE)

    def train_example(
        self, pixels: np.ndarray, film: LabelledFilm, rng: np.random.Generator, aug: AugmentConfig
    ) -> Example:
        label = self.label_of(film)
        assert label is not None
        img = pixels
        if rng.random() < self.p_mirror:
            img = np.ascontiguousarray(img[:, ::-1])
        if rng.random() < self.p_low_res:
            img = low_resolution_copy(img, rng)
        img = display_augment(film_augment(img, rng, aug), rng, aug)
        return Example(self.labels[label], img, label)


TASK = register(
    ViewTask(
        name="view",
        labels=KINDS,
        positive_labels=KINDS[1:],
        reason="not-frontal-chest",
        description=(
            "Is the film a frontal (PA/AP) chest radiograph? Otherwise: a lateral chest film, a radiograph of another "
            "body part, or not a radiograph at all (CT, MR, ultrasound slices)."
        ),
        film_kinds=KINDS,
        label_fn=_kind,
    )
)
