"""``pediatric-age``: the pediatric detector as an age estimate (years), cut where the header rule cuts.

The classifier (:mod:`filmgate_training.detectors.pediatric`) learns "child or adult" from labels that are almost all
one hospital's (Guangzhou's children against every other hospital's adults), so "which hospital" explains most of
them; left out of training, that hospital's children are mostly missed. An age is a quantity every film with a known
age teaches, adults included (ChestX-ray14, CheXpert, the spine set's children and adults), so the model has to learn
what changes with age rather than which hospital a film came from. The gate then applies the policy's one cut
(``policy.pediatric_age_years``, 10 by default) to the estimate, as it does to the header's age: nothing is
calibrated per model.

Targets are intervals in years, and the loss only penalises an estimate outside its interval (censored regression):

- a recorded age: that age (an interval of width 0);
- the children's hospital (``kermany``, ``kermany-fullres``): the ages its dataset documents, 1-5 years (1 to 6);
- a child without an age (``pediatric`` yes): under 18;
- an adult collection or an adult row without an age (``pediatric`` no; hannover, tbx11k, bimcv-covid19, which the
  data README's review found adult): 18 or more.

The network's output ``u`` is read as ``log(1 + age) - U0`` (errors of a year matter more at 3 than at 60, and an
output of 0 is a young adult); the exported model gives the age in years (:func:`age_in_years`), which is what the
gate reads (manifest kind ``age``). Inside training, :meth:`AgeTask.scores` is minus the age, so that the shared
"score >= threshold flags" machinery (evaluation, leave-one-source-out) applies unchanged with the threshold minus the
cut.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from filmgate.config import PolicyConfig
from filmgate_training.augment import display_augment, film_augment
from filmgate_training.config import AugmentConfig
from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors.degrade import low_resolution_copy
from filmgate_training.detectors.pediatric import ADULT_SOURCES
from filmgate_training.tasks import CardText, Example, LabelledTask, register

CUT_YEARS = PolicyConfig().pediatric_age_years  # the policy's default cut: header rule and image alike
ADULT_YEARS = 18.0
MAX_YEARS = 120.0
U0 = math.log1p(20.0)  # the output 0 reads as 20 years: a head started afresh begins among the adults
# What the children's hospital's dataset documents (Kermany et al. 2018: "pediatric patients of one to five years")
DOCUMENTED_AGES = {"kermany": (1.0, 6.0), "kermany-fullres": (1.0, 6.0)}
CLASS_SHARE = {"adult": 0.5, "child": 0.35, "minor": 0.15}


def age_interval(film: LabelledFilm) -> tuple[float, float] | None:
    """What the film's row says about its age, as an interval in years (None: nothing)."""
    if film.age is not None and 0 <= film.age <= MAX_YEARS:
        return (film.age, film.age)
    if film.source in DOCUMENTED_AGES and film.pediatric != "no":
        return DOCUMENTED_AGES[film.source]
    if film.pediatric == "yes":
        return (0.0, ADULT_YEARS)
    if film.pediatric == "no" or film.source in ADULT_SOURCES:
        return (ADULT_YEARS, MAX_YEARS)
    return None


def age_class(film: LabelledFilm) -> str | None:
    """The class the figures count it in: child (surely under the cut), adult (18 or more), or minor (under 18 and
    not surely under the cut: 10-17, or a child of unknown age), reported apart."""
    known = age_interval(film)
    if known is None:
        return None
    lo, hi = known
    if hi < CUT_YEARS or (lo == hi and lo < CUT_YEARS):
        return "child"
    return "adult" if lo >= ADULT_YEARS else "minor"


def _age_class_or_presumed_adult(film: LabelledFilm) -> str | None:
    """For held-out hospitals: frontal films without a recorded age count as adults (as for the classifier)."""
    known = age_class(film)
    return known if known is not None or film.kind != "frontal-chest" or film.pediatric else "adult"


def age_in_years(net: Any) -> Any:
    """The trained network wrapped so that the exported model outputs the age in years, (N, 1)."""
    import torch

    class AgeInYears(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.net = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.clamp(torch.exp(self.net(x) + U0) - 1.0, min=0.0)

    return AgeInYears(net)


def years(outputs: np.ndarray) -> np.ndarray:
    """The serving model's outputs -> ages in years, one per film."""
    return np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)[:, 0]


@dataclass(frozen=True)
class AgeTask(LabelledTask):
    p_mirror: float = 0.5
    p_low_res: float = 0.35  # both classes as 160-256 px JPEG copies: resolution is no clue (as the classifier)
    huber_beta: float = 0.05  # in log(1 + years): about 5% of the age

    def class_share(self) -> dict[str, float]:
        return dict(CLASS_SHARE)

    def for_held_out(self) -> AgeTask:
        return dataclasses.replace(self, label_fn=_age_class_or_presumed_adult)

    def train_example(
        self, pixels: np.ndarray, film: LabelledFilm, rng: np.random.Generator, aug: AugmentConfig
    ) -> Example:
        label, known = self.label_of(film), age_interval(film)
        assert label is not None and known is not None
        img = pixels
        if rng.random() < self.p_mirror:
            img = np.ascontiguousarray(img[:, ::-1])
        if rng.random() < self.p_low_res:
            img = low_resolution_copy(img, rng)
        img = display_augment(film_augment(img, rng, aug), rng, aug)
        lo, hi = known
        return Example(self.labels[label], img, label, target=(math.log1p(lo) - U0, math.log1p(hi) - U0))

    def serving_model(self, net: Any, mirror_swap: bool = False) -> Any:
        return age_in_years(super().serving_model(net, mirror_swap))

    def loss(self, outputs: Any, labels: Any) -> Any:
        """Huber loss of how far the estimate lies outside its interval (0 inside it)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        u = outputs[:, 0]
        outside = torch.relu(labels[:, 0] - u) + torch.relu(u - labels[:, 1])
        return F.smooth_l1_loss(outside, torch.zeros_like(outside), beta=self.huber_beta)

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Minus the estimated age: higher is younger, so "score >= minus the cut" flags films under the cut."""
        return -years(outputs)

    def manifest_threshold(self, threshold: float) -> float:
        return -threshold  # the manifest (kind age) holds the cut in years: flagged when the age is under it

    def extra_evaluation(self, config: Any, runner: Any, threshold: float) -> dict[str, Any]:
        from filmgate_training.detectors.age_eval import age_extra

        return age_extra(config, self, runner)

    def extra_markdown(self, extra: Mapping[str, Any]) -> str:
        from filmgate_training.detectors.age_eval import age_markdown

        return "\n".join(age_markdown(extra)) + "\n"

    def headline(self, extra: Mapping[str, Any]) -> dict[str, Any]:
        return {"mae_years": {r["band"]: r["mae"] for r in extra["mae_by_band"]},
                "shortcut_checks": {k: v["rate"] for k, v in extra["checks"].items()}}  # fmt: skip

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "cut": CUT_YEARS,
            "shares": ", ".join(f"{k} {v:.0%}" for k, v in CLASS_SHARE.items()),
            "p_low_res": self.p_low_res,
            "adult_sources": ", ".join(f"`{s}`" for s in ADULT_SOURCES),
        }


CARD = CardText(
    purpose=(
        "Estimates the patient's age in years from the film, for films whose header gives no usable age. The gate "
        "applies the policy's cut (`policy.pediatric_age_years`, {cut:g} by default) to the estimate as it does to "
        "the header's age (PatientAge, or birth and study dates), which stays the first line."
    ),
    data=(
        "Every film with something known about its age: a recorded age (ChestX-ray14, CheXpert frontal and lateral, "
        "the `spine` set's children and adults) as the target; the children's hospital (`kermany`, "
        "`kermany-fullres`, no recorded ages) as the interval its dataset documents, 1 to 6 years; children without "
        "an age as under 18; adult collections without ages ({adult_sources}) as 18 or more. The loss (Huber, in "
        "log(1 + years)) only penalises an estimate outside its interval. Classes sampled {shares} (child: under "
        "the cut; minor: 10-17 or a child of unknown age), sources balanced within a class; {p_low_res:.0%} of "
        "samples of every class are turned into 160-256 px JPEG copies against the resolution shortcut."
    ),
    measured=(
        "Flagged = estimated age under the cut ({cut:g} years; nothing calibrated). Per source on the val frontal "
        "chest films (the only films on which the gate uses the estimate); `minor` films are counted as not "
        "positive here and reported apart in leave-one-source-out. The mean absolute error per age band, against "
        "the published anchors, follows."
    ),
    limits=(
        "Children's chest films come from one hospital (Guangzhou, 1-5 years) and carry no recorded age: the "
        "estimate for young children is learnt from an interval, and no chest film of a child of 6-17 with a "
        "recorded age exists here (the 10-17 figures are spine films). Use the header's age wherever it exists.",
        "The model is for frontal chest films; on other films (spine, knee...) the gate drops its `pediatric` "
        "(`policy.outranks`: such films are `not-frontal-chest`).",
    ),
)


TASK = register(
    AgeTask(
        name="pediatric",
        labels=("adult", "child", "minor"),
        positive_labels=("child",),
        reason="pediatric",
        description=(
            f"The patient's age in years, estimated from the film; the gate applies the policy's cut "
            f"(policy.pediatric_age_years, {CUT_YEARS:g} by default) to it as to the header's age, which stays the "
            "first line."
        ),
        kind="age",
        film_kinds=("frontal-chest", "lateral-chest", "other-radiograph"),
        # laterals with a recorded age teach age too; other radiographs only from the spine set (children and adults
        # of one source)
        film_filter=lambda f: f.kind != "other-radiograph" or f.source == "spine",
        val_kinds=("frontal-chest",),
        label_fn=age_class,
        ignored_labels=("minor",),
        fixed_threshold=-CUT_YEARS,
        card=CARD,
    ),
    key="pediatric-age",
)
