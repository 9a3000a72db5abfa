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
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.labelled import MirroredLowResTask
from filmgate_training.tasks import CardText, register

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

    def extra_evaluation(self, config: Any, runner: Any, threshold: float) -> dict[str, Any]:
        """The shortcut checks (adults as the children's hospital's 224 px copies...) and the spine films by age."""
        from filmgate_training.detectors.extra_eval import pediatric_extra

        return pediatric_extra(config, runner, threshold)

    def extra_markdown(self, extra: Mapping[str, Any]) -> str:
        from filmgate_training.detectors.extra_eval import pediatric_markdown

        return "\n".join(pediatric_markdown(extra)) + "\n"

    def headline(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"shortcut_checks": {k: v["rate"] for k, v in extra["checks"].items()}}

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        spine = extra.get("spine_by_age", [])
        films, right = sum(r["films"] for r in spine), sum(r["right"] for r in spine)
        return {
            "share_child": CLASS_SHARE["child"],
            "share_adult": CLASS_SHARE["adult"],
            "p_low_res": self.p_low_res,
            "adult_sources": ", ".join(f"`{s}`" for s in ADULT_SOURCES),
            "spine_val_films": films,
            "spine_right": right,
            "spine_accuracy": right / films if films else float("nan"),
        }


CARD = CardText(
    purpose=(
        "Finds children's films when the header gives no usable age. The gate's metadata rule (PatientAge, or birth "
        "and study dates) stays the first line; this image model is for films whose age is missing or implausible."
    ),
    data=(
        "Labelled by `pediatric` in labels.csv (yes < 18 years): frontal "
        "chest films plus the `spine` collection, which holds children and adults from one source (so 'which "
        "hospital' cannot explain its labels). Classes sampled {share_adult:.0%}/{share_child:.0%}, sources balanced "
        "within a class. Against the resolution shortcut (`kermany` is a 224 px square copy), {p_low_res:.0%} of "
        "samples of *both* classes are turned into 160-256 px JPEG copies (half of them stretched to a square) before "
        "the usual augmentation. Adult collections without ages, labelled adult by source: {adult_sources} "
        "(training/detectors/pediatric.py)."
    ),
    measured=(
        "Accuracy per source on the val frontal chest films (the only films on which the gate uses this model's "
        "verdict; the spine films it also trained on are shown by age below), and the shortcut checks: adult val "
        "films made into 224 px and 160 px square JPEG copies (what the pediatric `kermany` copy looks like) must "
        "stay adult; children's full-resolution films as 224 px copies must stay children."
    ),
    limits=(
        "Almost all children's chest films come from one hospital (Guangzhou, ages 1-5). The guards above reduce "
        "but cannot rule out that the model partly recognises that hospital; teenagers are nearly absent from the "
        "chest films, so children of 12-17 may be called adult. Use the metadata rule wherever the header has an age.",
        "Adult films without an age (vqa-rad, openi, radiopaedia) were not trained on; their rate is reported.",
        "The model is for frontal chest films. On the `spine` collection (not chest films; trained on only to break "
        "the hospital shortcut) it calls most films children, adults of 18-35 included: {spine_right} of its "
        "{spine_val_films} val films right ({spine_accuracy:.0%}; table above). In the gate this never decides a "
        "spine film: the view detector quarantines it as `not-frontal-chest`, and `policy.outranks` drops the image "
        "model's `pediatric` there (a header age still counts).",
    ),
)


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
        card=CARD,
    )
)
