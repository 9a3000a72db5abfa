"""``flip``: is the frontal chest film a mirror image (left and right swapped)?

Self-supervised: every frontal chest film of the train split, adult and child, shown as it came (``normal``) or
mirrored left-right (``flipped``). What tells them apart is anatomy (heart and aortic knob on the patient's left,
gastric bubble under the left diaphragm, liver on the right) and burned-in markers, whose glyphs mirror with the film
(the framework burns film markers *before* the transform and viewer overlays *after* it, so readable text is no clue
by itself). Mirrored films are the commonest error in the literature and the one that falls most across hospitals,
so evaluation is per source.

``model.mirror_swap`` exports the network mirror-consistent (it scores the film and its mirror image, so the two
always get complementary scores) at twice the cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from filmgate_training.detectors.faults import identity, mirror
from filmgate_training.tasks import CardText, SyntheticTask, register


@dataclass(frozen=True)
class FlipTask(SyntheticTask):
    """Mirror images; its extra evaluation is per source (mirroring is what falls most across hospitals)."""

    def extra_evaluation(self, config: Any, runner: Any, threshold: float) -> dict[str, Any]:
        from filmgate_training.detectors.extra_eval import flip_extra

        return flip_extra(config, runner, threshold)

    def extra_markdown(self, extra: Mapping[str, Any]) -> str:
        from filmgate_training.detectors.extra_eval import flip_markdown

        return "\n".join(flip_markdown(extra)) + "\n"

    def headline(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"per_source_accuracy": {k: v["accuracy"] for k, v in extra["per_source"].items()}}

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        per = {s: m for s, m in extra["per_source"].items()}
        ranked = sorted(per, key=lambda s: per[s]["accuracy"])
        films = [m["films"] for s, m in report["val"]["per_source"].items() if not s.startswith("kermany")]
        return {
            "per_source": ", ".join(f"{s} {per[s]['accuracy']:.1%} ({per[s]['films']} films)" for s in ranked),
            "worst_source": ranked[0] if ranked else "n/a",
            "worst_accuracy": per[ranked[0]]["accuracy"] if ranked else float("nan"),
            "adult_val_films": f"{min(films)}-{max(films)}" if films else "n/a",
        }


CARD = CardText(
    purpose=(
        "Finds frontal chest films displayed as a mirror image (patient's left on the viewer's left). Mirrored films "
        "are the commonest orientation error in the literature and the one that generalises worst across hospitals."
    ),
    data=(
        "Self-supervised: every frontal chest film of the train split (adult and child) shown as it came (`normal`) "
        "or mirrored left-right (`flipped`), chosen at random per sample. Burned-in markers are drawn on the film "
        "before the mirror (so their glyphs mirror with it, as on a really mirrored film) and viewer overlays after "
        "it (readable on both classes), so readable text alone is no clue."
    ),
    measured=(
        "Every val frontal film is scored as it came and mirrored; accuracy and unaltered films flagged, per source."
    ),
    limits=(
        "**Per source** (val frontal films as they came and mirrored, lowest first): {per_source}.",
        "Mirroring is synthetic; dextrocardia, situs inversus and films with one hemithorax opaque are real "
        "'mirror-looking' films that will be flagged (a person should look at them anyway).",
        "The NIH film stored upside down is left out of the figures (as for orientation and inversion): turned "
        "180 degrees is mirrored *and* upside down, and the gate quarantines it as rotated.",
        "Most val films are pediatric (kermany); adult sources have {adult_val_films} val films each.",
    ),
)

TASK = register(
    FlipTask(
        name="flip",
        labels=("normal", "flipped"),
        positive_labels=("flipped",),
        reason="flipped",
        description=(
            "Is the frontal chest film mirrored left-right (patient's left shown on the viewer's left)? "
            "flipped = numpy.fliplr of the film as it should be displayed."
        ),
        film_kinds=("frontal-chest",),
        transforms=(identity, mirror),
        mirror_pair=True,
        card=CARD,
    )
)
