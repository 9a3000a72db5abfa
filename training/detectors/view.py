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

from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.labelled import MirroredLowResTask
from filmgate_training.tasks import register

KINDS = ("frontal-chest", "lateral-chest", "other-radiograph", "not-radiograph")
# Share of training samples per class. Frontal films are the negatives that decide the false-positive rate, so they
# keep the largest share; the rare lateral class gets a quarter on its own.
CLASS_SHARE = {"frontal-chest": 0.4, "lateral-chest": 0.2, "other-radiograph": 0.25, "not-radiograph": 0.15}


def _kind(film: LabelledFilm) -> str | None:
    return film.kind if film.kind in KINDS else None


@dataclass(frozen=True)
class ViewTask(MirroredLowResTask):
    p_low_res: float = 0.15

    def class_share(self) -> dict[str, float]:
        """Target share of each label among training samples (the sampler weights films to reach it)."""
        return dict(CLASS_SHARE)


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
