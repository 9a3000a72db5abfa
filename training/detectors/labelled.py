"""The training example of the labelled image detectors (``view``, ``pediatric``): one recipe, two tasks.

Both see each film possibly mirrored (neither answer depends on the side: that is the ``flip`` detector's job) and
possibly as a low-resolution JPEG copy (so resolution, which differs by hospital, carries no label), then the common
film and display augmentations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from filmgate_training.augment import display_augment, film_augment
from filmgate_training.config import AugmentConfig
from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.degrade import low_resolution_copy
from filmgate_training.tasks import Example, LabelledTask


@dataclass(frozen=True)
class MirroredLowResTask(LabelledTask):
    p_mirror: float = 0.5
    p_low_res: float = 0.15

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
