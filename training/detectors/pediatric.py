"""``pediatric``: is the film of a child (< 18 years)? The image model behind the gate's metadata age rule.

Labels come from ``labels.csv`` (``pediatric`` yes/no; ``hannover`` is an adult collection without ages). Almost all
children's chest films come from one hospital (Guangzhou, ``kermany`` and ``kermany-fullres``), and ``kermany`` is a
224 px square copy, so a model could learn the hospital or the resolution. Guards:

- every film is preprocessed the same way (the manifest's spec, as in the gate);
- :func:`filmgate_training.detectors.degrade.low_resolution_copy` turns films of *both* classes
into 160-256 px JPEG copies,
  so that resolution carries no label;
- the ``spine`` collection has children *and* adults from one source, so "which hospital" cannot explain it;
- evaluation is per source, plus adult val films reduced to a 224 px square copy (must stay adult). The val figures
  cover frontal chest films, the only films on which the gate uses the model's verdict; the spine val films are
  reported separately, by age (:mod:`filmgate_training.detectors.extra_eval`).
"""

from __future__ import annotations

from dataclasses import dataclass

from filmgate.datasets import LabelledFilm
from filmgate_training.detectors.labelled import MirroredLowResTask
from filmgate_training.tasks import register

ADULT_SOURCES = ("hannover",)  # adult collections whose rows carry no age
CLASS_SHARE = {"adult": 0.5, "child": 0.5}


def _age_class(film: LabelledFilm) -> str | None:
    if film.pediatric == "yes":
        return "child"
    if film.pediatric == "no" or film.source in ADULT_SOURCES:
        return "adult"
    return None


@dataclass(frozen=True)
class PediatricTask(MirroredLowResTask):
    p_low_res: float = 0.35

    def class_share(self) -> dict[str, float]:
        return dict(CLASS_SHARE)


TASK = register(
    PediatricTask(
        name="pediatric",
        labels=("adult", "child"),
        positive_labels=("child",),
        reason="pediatric",
        description=(
            "Is the film of a child (under 18)? Used by the gate for films whose age is missing or implausible; the "
            "metadata rule (PatientAge, or birth and study dates) stays the first line."
        ),
        film_kinds=("frontal-chest", "other-radiograph"),
        # other-radiograph only for the spine collection: children and adults from one source (anti-shortcut)
        film_filter=lambda f: f.kind == "frontal-chest" or f.source == "spine",
        # the gate judges age from the image only on frontal chest films (policy.outranks drops it on the rest):
        # val figures are over those; the spine films are reported by age in the extra evaluation
        val_kinds=("frontal-chest",),
        label_fn=_age_class,
    )
)
