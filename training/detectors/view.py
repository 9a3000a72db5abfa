"""``view``: is this a frontal chest radiograph? frontal-chest, lateral-chest, other-radiograph, not-radiograph.

Labels come from ``labels.csv`` (``kind``). Everything but ``frontal-chest`` is positive (reason
``not-frontal-chest``; the predicted class goes into the sidecar). Only 23 lateral chest films are in the train split,
so they are shown far more often than their share (see :meth:`ViewTask.sample_weight`) and each time differently:
mirrored (a lateral may face either way), tilted, cropped, zoomed, re-windowed, with markers, as a low-resolution copy.
Frontal films are mirrored too, so that the view model does not care about the flip (that is the ``flip`` detector's
job) and a mirrored frontal film is not mistaken for something else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.labelled import MirroredLowResTask
from filmgate_training.tasks import CardText, register

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

    def extra_evaluation(self, config: Any, runner: Any, threshold: float) -> dict[str, Any]:
        """Recall per kind with exact lower bounds, realistic variants of the val laterals, mirrored frontal films."""
        from filmgate_training.detectors.extra_eval import view_extra

        return view_extra(config, runner, threshold)

    def extra_markdown(self, extra: Mapping[str, Any]) -> str:
        from filmgate_training.detectors.extra_eval import view_markdown

        return "\n".join(view_markdown(extra)) + "\n"

    def headline(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        others = {k: v for k, v in extra["by_kind"].items() if k != "frontal-chest"}
        return {
            "kept_out_by_kind": {k: v["rate"] for k, v in others.items()},
            "kept_out_lower95_by_kind": {k: v["lower95"] for k, v in others.items()},
            "frontal_flagged": extra["by_kind"]["frontal-chest"]["rate"],
            "lateral_variants_kept_out": extra["lateral_variants"]["rate"],
            "frontal_mirrored_flagged": extra["frontal_mirrored"]["rate"],
        }

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        by_kind, confusion = extra["by_kind"], report["calibration"]["confusion"]
        missed = [(kind, rel, score) for kind, films in extra.get("missed", {}).items() for rel, score in films]
        return {
            **{f"share_{k.replace('-', '_')}": v for k, v in CLASS_SHARE.items()},
            "val_laterals": by_kind["lateral-chest"]["n"],
            "laterals_kept_out": by_kind["lateral-chest"]["flagged"],
            "laterals_lower95": by_kind["lateral-chest"]["lower95"],
            "val_other_radiographs": by_kind["other-radiograph"]["n"],
            "val_not_radiographs": by_kind["not-radiograph"]["n"],
            "variants_per_film": extra["lateral_variants"]["variants_per_film"],
            "calibration_laterals": sum(confusion[KINDS.index("lateral-chest")]),
            "frontal_flagged": by_kind["frontal-chest"]["flagged"],
            "val_frontal": by_kind["frontal-chest"]["n"],
            "others_let_through": len(missed),
            "let_through": "; ".join(f"{kind} `{rel}` (score {score:.2f})" for kind, rel, score in missed) or "none",
        }


CARD = CardText(
    purpose=(
        "Keeps everything that is not a frontal chest radiograph out of the accept path: lateral chest films, "
        "radiographs of other body parts (knee, spine, skull, hand, pelvis, abdomen, teeth...), and images that are "
        "not radiographs (CT, MR, ultrasound slices). DICOM tags cannot do this: BodyPartExamined is wrong in about "
        "15% of images. The predicted class (the arg-max label) goes into the sidecar."
    ),
    data=(
        "Labelled by `kind` in labels.csv: every `frontal-chest` film (adult and child) is the negative class; "
        "`lateral-chest`, `other-radiograph` and `not-radiograph` films are the three positive classes. Classes are "
        "sampled by share (frontal {share_frontal_chest:.0%}, lateral {share_lateral_chest:.0%}, other radiograph "
        "{share_other_radiograph:.0%}, not a radiograph {share_not_radiograph:.0%}; "
        "`training/detectors/view.py`), sources balanced within a class. Lateral films are few in the training "
        "part of the train split, so each is seen hundreds of times and never twice alike: mirrored (a lateral may "
        "face either way), tilted, cropped, stretched, collimated, re-windowed, with burned-in markers, as a "
        "low-resolution JPEG copy. Frontal films are mirrored too, so the view model ignores flips."
    ),
    measured=(
        "Recall with so few laterals: the val split has {val_laterals} real lateral films; all of them are scored as "
        "they came and the exact one-sided 95% lower bound of the rate is given ({laterals_kept_out}/{val_laterals} "
        "proves only >= {laterals_lower95:.0%}). To say more, each val lateral is also scored in {variants_per_film} "
        "realistic variants (mirrored, tilted, cropped, re-windowed, markers, noise): a robustness figure, not an "
        "independent sample. Other radiographs ({val_other_radiographs}) and non-radiographs ({val_not_radiographs}) "
        "give tighter bounds. The {calibration_laterals} lateral films of the calibration holdout were not trained "
        "on either."
    ),
    limits=(
        "Real lateral films are few here: lateral films from other hospitals, decubitus or oblique views, and "
        "unusual body parts may be missed. The atypical detector is the second net.",
        "Frontal films of children are `frontal-chest` for this model (the pediatric detector handles age).",
        "On val it flags {frontal_flagged} of {val_frontal} frontal films and lets {others_let_through} other "
        "film(s) through ({let_through}); extra.md names them. `policy.thresholds.view` in the gate's config moves "
        "this trade-off.",
    ),
)


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
        card=CARD,
    )
)
