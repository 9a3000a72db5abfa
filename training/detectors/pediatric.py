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

import dataclasses
from dataclasses import dataclass

from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.labelled import MirroredLowResTask
from filmgate_training.tasks import register

# Adult collections whose rows carry no age: hannover; tbx11k and bimcv-covid19 (added 2026-12-01; the data README's
# review of about 600 of them on contact sheets found them adult). Pediatric 1.1.0 was trained before the latter two.
ADULT_SOURCES = ("hannover", "tbx11k", "bimcv-covid19")
CLASS_SHARE = {"adult": 0.5, "child": 0.5}


def _age_class(film: LabelledFilm) -> str | None:
    if film.pediatric == "yes":
        return "child"
    if film.pediatric == "no" or film.source in ADULT_SOURCES:
        return "adult"
    return None


def _age_class_or_presumed_adult(film: LabelledFilm) -> str | None:
    """For held-out hospitals: frontal films without a recorded age count as adults (the data README's review found
    the new sources' films adult; the gate must accept clean films of unknown age), so their false flags are seen."""
    known = _age_class(film)
    return known if known is not None or film.kind != "frontal-chest" or film.pediatric else "adult"


@dataclass(frozen=True)
class PediatricTask(MirroredLowResTask):
    p_low_res: float = 0.35

    def class_share(self) -> dict[str, float]:
        return dict(CLASS_SHARE)

    def for_held_out(self) -> PediatricTask:
        return dataclasses.replace(self, label_fn=_age_class_or_presumed_adult)


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
