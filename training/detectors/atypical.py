"""``atypical``: how unlike a clean frontal chest film is a film? A score task with no training loop of its own.

The score (:mod:`.atypical_net`) is a distance on the shipped ``view`` network's features and five display
statistics; its hooks (:mod:`.atypical_build`) fit it, evaluate it on every kind of val film and give the manifest
its figures; the card is the templates below, filled from the evaluation report. Built, like every detector, by
``python -m filmgate_training all --config atypical``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from filmgate_training.datasets import LabelledFilm
from filmgate_training.detectors import atypical_build
from filmgate_training.detectors.atypical_net import N_STATS
from filmgate_training.graph import GraphDef, register_graph
from filmgate_training.tasks import CardText, Example, Task, register


@dataclass(frozen=True)
class AtypicalTask(Task):
    """A ``score`` task built on the shipped ``view`` network (no training loop of its own)."""

    backbone_task: str = "view"

    def fit(self, config: Any, **options: Any) -> Any:
        """Fit the Gaussian and the threshold on the shipped view network (``backbone_run``: on a run's model.pt)."""
        return atypical_build.fit(config, options.get("backbone_run"))

    def load_run(self, config: Any) -> tuple[Any, dict[str, Any]]:
        return atypical_build.load_run(config)

    def evaluation(self, config: Any, runner: Any) -> dict[str, Any]:
        """Val films flagged per kind and source, synthetic wrong films caught, the most atypical val films."""
        return atypical_build.evaluation(config, runner, sheet_dir=config.run_path / "sheets")

    def manifest_metrics(self, report: Mapping[str, Any]) -> dict[str, Any]:
        return atypical_build.manifest_metrics(dict(report))

    def manifest_extra(self, blob: Mapping[str, Any]) -> dict[str, Any]:
        backbone = blob["build"]["backbone"]
        return {"backbone": f"{backbone['task']} {backbone['version']}"}

    def fit_fold(self, config: Any) -> tuple[Any, float, str]:
        """A leave-one-source-out fold: refit without ``data.exclude_sources`` on the same backbone."""
        net, threshold, backbone = atypical_build.fit_score(config)
        return net, threshold, f"refit on {backbone}"

    def report_markdown(self, report: Mapping[str, Any]) -> str:
        """Its evaluation.md (by kind, per source, synthetic wrong films, real DICOM files, most atypical films)."""
        return atypical_build.report_markdown(dict(report))

    def eval_examples(self, pixels: np.ndarray, film: LabelledFilm) -> list[Example]:
        """A film as it came, labelled typical (a frontal chest film): what a fold's false flags are counted on."""
        return [Example("as-is", pixels, 0)]

    def card_figures(self, config: Any, report: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
        """The card's figures, from evaluation.json (its ``build`` is the fit's record) and the config."""
        b, by_kind = report["build"], report["val"]["by_kind"]
        per = report["val"]["frontal_per_source"]
        adult = {s: m for s, m in per.items() if not s.startswith("kermany")}  # kermany*: the children's hospital
        adult_films = sum(m["films"] for m in adult.values())
        adult_flagged = sum(m["flagged"] for m in adult.values())
        worst = max(adult, key=lambda s: adult[s]["rate"]) if adult else "none"
        rates = lambda d: ", ".join(f"{k} {100 * v['rate']:.2f}%" for k, v in d.items())  # noqa: E731
        return {
            "zscore_rel_diff": b["zscore_rebuild_rel_diff"],
            "shrink": atypical_build.SHRINK,
            "source_balance": config.data.source_balance,
            "content_dims": b["embedding_dims"] - N_STATS,
            "stats": N_STATS,
            "quantile": 1 - config.evaluate.target_fpr,
            "unit_content": b["unit_content"],
            "unit_display": b["unit_display"],
            "fit_films": sum(b["fit_films"].values()),
            "calibration_films": sum(b["calibration_films"].values()),
            "threshold_rule": report["threshold_rule"],
            "backbone_from": b["backbone"].get("from", ""),
            "backbone_version": b["backbone"].get("version", ""),
            "calibration_synthetic": rates(b.get("calibration_synthetic", {})),
            "val_notes": " ".join(config.val_notes) or "None did.",
            "frontal_flagged": by_kind["frontal-chest"]["flagged"],
            "frontal_films": by_kind["frontal-chest"]["films"],
            "frontal_rate": by_kind["frontal-chest"]["rate"],
            "lateral_rate": by_kind["lateral-chest"]["rate"],
            "other_rate": by_kind["other-radiograph"]["rate"],
            "not_radiograph_rate": by_kind["not-radiograph"]["rate"],
            "synthetic": rates(report["synthetic"]),
            "adult_flagged": adult_flagged,
            "adult_films": adult_films,
            "adult_rate": adult_flagged / max(adult_films, 1),
            "worst_adult": worst,
            "worst_flagged": adult[worst]["flagged"] if adult else 0,
            "worst_films": adult[worst]["films"] if adult else 0,
            "children_flagged": sum(m["flagged"] for s, m in per.items() if s.startswith("kermany")),
        }


CARD = CardText(
    purpose=(
        "An out-of-distribution score: how unlike a clean frontal chest film a film is. It is the second net behind "
        "the classifiers, for films nobody labelled: heavily collimated or zoomed, washed out or nearly blank, "
        "screenshots, and films of the wrong thing that the other detectors miss."
    ),
    method=(
        "1. From the `unit` input the model rebuilds the view network's z-scored input (padding = all-zero edge rows "
        "and columns; relative feature difference to the gate's own z-score on real films: {zscore_rel_diff:.2g}).\n"
        "2. The trained `view` network (models/view) gives mean-pooled features after its 128-wide and 192-wide "
        "stages; {stats} display statistics are added (mean and log spread of grey, share of near-white and "
        "near-black pixels, share of padding).\n"
        "3. Two Mahalanobis distances (per dimension; standardised, covariance shrunk {shrink:.0%} towards the "
        "identity) to the train split's frontal chest films (sources balanced as n^{source_balance:g}): content "
        "(the {content_dims} view features) and display (the {stats} statistics), kept apart so that {stats} numbers "
        "are not drowned by {content_dims}. Each is divided by its own {quantile:.1%} calibration quantile (content "
        "{unit_content:.3f}, display {unit_display:.3f}); the score is the larger of the two."
    ),
    data=(
        "Fitted on {fit_films} frontal chest films of the train split (those the view network trained on), each both "
        "as it came and auto-windowed (0.5th-99.5th percentile, which is how the gate shows a DICOM file without a "
        "window); threshold from {calibration_films} held-out train frontal films ({threshold_rule}). Built on the "
        "shipped view network itself (`{backbone_from}`, view {backbone_version}, rebuilt in torch from the ONNX "
        "file, so no run folder is needed). The Gaussian covers every train source in the table below, including "
        "those the view network never trained on.\n\n"
        "Synthetic wrong films made from the held-out *train* adult frontal films (what the build judges a design "
        "by): {calibration_synthetic}.\n\n"
        "**Which choices looked at val**: the threshold, the Gaussian and the calibration never did. {val_notes}"
    ),
    measured=(
        "- Frontal chest films flagged: {frontal_flagged}/{frontal_films} ({frontal_rate:.2%}); per source in "
        "evaluation.md.\n"
        "- Also flagged (these are the view detector's job; this is the second net): lateral {lateral_rate:.2%}, "
        "other radiographs {other_rate:.2%}, not radiographs {not_radiograph_rate:.2%}.\n"
        "- Synthetic wrong films made from val adult frontal films (`training/detectors/corrupt.py`): {synthetic}."
    ),
    limits=(
        "The frontal films it flags are adults' ({adult_flagged} of {adult_films} val frontal films from adult "
        "sources ({adult_rate:.1%}; worst {worst_adult} {worst_flagged}/{worst_films}) against {children_flagged} of "
        "the children's): washed-out or hazy films and teaching-file images in black frames with annotations (see "
        "'most atypical' in evaluation.md), i.e. films a research set may well not want, but good films among them "
        "are lost too.",
        "A distance is not a diagnosis: it flags what is *unusual* relative to these training sources. Frontal films "
        "from a hospital with a very different look may score higher; check the per-source rates on your own films "
        "and override the threshold in the gate's config (`policy.thresholds.atypical`) if needed.",
        "Depends on models/view: retraining view requires rebuilding this model "
        "(`python -m filmgate_training all --config atypical`).",
    ),
)


GRAPH = register_graph(
    GraphDef(
        name="view-atypical",
        members=("view", "atypical"),
        build=atypical_build.shared_graph,
        why=(
            "atypical's score is a distance on the view network's features: in one graph the gate computes the view "
            "network once per film for both (a second pass only for films whose rebuilt z-score input differs "
            "from the gate's), not twice"
        ),
    )
)


TASK = register(
    AtypicalTask(
        name="atypical",
        labels=("typical", "atypical"),
        positive_labels=("atypical",),
        reason="atypical",
        description=(
            "How unlike a clean frontal chest film the film is: the larger of two Mahalanobis distances to the train "
            "split's frontal chest films, over the view network's features and over five display statistics, each in "
            "units of its calibration quantile."
        ),
        film_kinds=("frontal-chest",),
        kind="score",
        card=CARD,
    )
)
