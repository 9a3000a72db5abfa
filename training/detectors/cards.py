"""Model cards for flip, view, pediatric (:func:`classifier_card`) and score detectors such as atypical
(:func:`score_card`): what each is for, how it was made and measured, what it cannot do.

The framework's card (:mod:`filmgate_training.card`) describes self-supervised
orientation/inversion models; these detectors
need their own words (labelled data, how few laterals there are, the pediatric shortcut, a distance score): each
task carries them (:attr:`filmgate_training.tasks.Task.card`, templates filled by its ``card_figures`` from the
evaluation and extra JSON), and the card is assembled here from them, the manifest and the reports.
"""

from __future__ import annotations

from typing import Any

from filmgate.manifest import ModelManifest
from filmgate.typed_config import ConfigError
from filmgate_training.card import training_data_table
from filmgate_training.config import Config
from filmgate_training.tasks import get_task

MIRROR_SWAP = (
    "The exported graph is mirror-consistent (`filmgate_training.model.MirrorSwap`): it runs the network on the film "
    "and on its "
    "mirror image and averages the logits with the second pair swapped, so a film and its mirror image always get "
    "complementary scores and the network's own left-right biases cancel (two passes per film). "
)

def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _phases(config: Config) -> list[dict]:
    """The runs this one was fine-tuned from, first run first (each run's config.json names its ``init_from``)."""
    import json
    from pathlib import Path

    from filmgate_training.config import REPO_ROOT

    chain: list[dict] = []
    base = config.train.init_from
    while base and len(chain) < 10:
        path = Path(base) if Path(base).is_absolute() else REPO_ROOT / base
        try:
            cfg = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            chain.append({"run": base})
            break
        chain.append({"run": base, **cfg})
        base = cfg.get("train", {}).get("init_from", "")
    return chain[::-1]


def _shipped_init(config: Config) -> dict[str, Any] | None:
    """The shipped model a run was fine-tuned from (``train.init_from`` naming a model.onnx): its manifest."""
    import json
    from pathlib import Path

    from filmgate_training.config import REPO_ROOT

    base = config.train.init_from
    if not base.endswith(".onnx"):
        return None
    folder = (Path(base) if Path(base).is_absolute() else REPO_ROOT / base).parent
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, ValueError):
        return {"name": folder.name, "version": "?", "sha256": "?"}


def _init_line(config: Config) -> str:
    """Say so when the run was fine-tuned from earlier ones (and how those were trained)."""
    shipped = _shipped_init(config)
    if shipped is not None:
        before = shipped.get("extra", {}).get("config", {}).get("train", {}).get("init_from", "")
        return (f"Fine-tuned from the shipped `{shipped['name']}` {shipped['version']} (its ONNX file, sha256 "
                f"{shipped['sha256'][:12]}..., rebuilt in torch with each BatchNorm folded into its convolution"
                + (f"; that model was itself fine-tuned from `{before}`" if before else "") + "): ")  # fmt: skip
    phases = _phases(config)
    if not phases:
        return ""
    parts = []
    for i, ph in enumerate(phases):
        try:
            t, size = ph["train"], ph["preprocessing"]["size"]
            what = (f"{t['steps']} steps at {size} px, lr {t['lr']}, source balance {ph['data']['source_balance']}, "
                    f"seed {t['seed']}")  # fmt: skip
        except KeyError:
            what = "see its config.json"
        parts.append(f"{'first trained from scratch' if i == 0 else 'fine-tuned'} as `{ph['run']}` ({what})")
    return "; ".join(parts).capitalize() + "; then fine-tuned: "


def _reproduce(config: Config, name: str) -> str:
    cfg = config.run_path.name  # the config file is named like its run folder (runs/flip-ft <- flip-ft.yaml)
    shipped = _shipped_init(config)
    if shipped is not None:
        return (f"Reproduce: with `{config.train.init_from}` as shipped at {shipped['name']} {shipped['version']} "
                f"(git history), `python -m filmgate_training all --config {cfg}` then "
                f"`python -m filmgate_training finish --config {cfg}`.")  # fmt: skip
    earlier = [
        f"`python -m filmgate_training fit --config {p['run'].rstrip('/').split('/')[-1]}`" for p in _phases(config)
    ]
    first = f"{', then '.join(earlier)} (earlier phases), then " if earlier else ""
    return (
        f"Reproduce: {first}`python -m filmgate_training all --config {cfg}` then "
        f"`python -m filmgate_training finish --config {cfg}`."
    )


def classifier_card(
    config: Config, manifest: ModelManifest, report: dict[str, Any], blob: dict[str, Any], parity: dict[str, Any],
    extra: dict[str, Any], extra_md: str,
) -> str:  # fmt: skip
    name = manifest.name
    task = get_task(config.task)
    if task.card is None:
        raise ConfigError(f"task: {task.name} has no card text of its own (Task.card); its card is the framework's")
    figures = task.card_figures(config, report, extra)
    card = {k: task.card.fill(getattr(task.card, k), figures) for k in ("purpose", "data", "measured")}
    limits = [task.card.fill(x, figures) for x in task.card.limits]
    val = report["val"]
    p = val["pooled"]
    if manifest.kind == "age":
        use = (f"- Kind `age`: the output is the estimated age in years (score = that age); the gate quarantines "
               f"with reason `{manifest.reason}` when it is **under** the policy's cut (`policy.pediatric_age_years`, "
               f"{manifest.threshold:.6g} by default, the cut of the header's age too).")  # fmt: skip
        output = "Output `output`: (N, 1), years."
    else:
        use = (f"- Kind `classifier`; labels {', '.join(f'`{x}`' for x in manifest.labels)}; score = softmax mass "
               f"of {', '.join(f'`{x}`' for x in manifest.positive_labels)}; the gate quarantines with reason "
               f"`{manifest.reason}` when score >= **{manifest.threshold:.6g}**.")  # fmt: skip
        output = "Output `output`: logits."
    lines = [
        f"# Model card: `{name}` {manifest.version}",
        "",
        card["purpose"],
        "",
        "## Use",
        "",
        use,
        f"- Input `image` float32 (N, 1, {config.preprocessing.size}, {config.preprocessing.size}), dynamic batch: "
        "the film decoded by `filmgate.decode`, then `filmgate.preprocess` with "
        f"`{config.preprocessing.to_dict()}`. {output}",
        "",
        "## Model",
        "",
        f"FilmNet (training/model.py), widths {list(config.model.widths)}, {blob['parameters']:,} parameters, trained "
        f"from scratch (phases below), served at {config.preprocessing.size} px (the property is global: a whole film "
        "at 128-192 px shows the view, the heart side and the body proportions; it keeps every detector at a few ms "
        "per film on one core). "
        + (MIRROR_SWAP if config.model.mirror_swap else "")
        + f"ONNX opset 17; torch vs onnxruntime max |output diff| {parity['max_abs_diff']:.2g} on real val films.",
        "",
        "## Training data",
        "",
        card["data"],
        "",
        _init_line(config)
        + f"{blob['steps']} steps of batch {config.train.batch_size}, AdamW lr {config.train.lr}, seed "
        f"{config.train.seed}; {blob['train_seconds'] / 60:.1f} min on {blob['device']} with {blob['threads']} "
        f"thread(s). {config.data.calibration_fraction:.0%} of train patients were held out to choose the threshold; "
        "`val` was never trained on. **Which choices looked at val**: " + _val_note(config),
        "",
        *training_data_table(manifest),
    ]
    lines += [
        "",
        "## Evaluation (val split, through decode + preprocess + this ONNX file)",
        "",
        f"Threshold {manifest.threshold:.6g}: {report['threshold_rule']}.",
        "",
        card["measured"],
        "",
        "| | films | accuracy (arg-max class) | AUC | recall | negatives flagged |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| pooled | {report['val_films']} | {_pct(p['accuracy'])} | {p['auc'] or 0:.5f} | {_pct(p['recall'])} | "
        f"{_pct(p['fpr_unaltered'])} ({p['flagged_unaltered']}/{p['unaltered']}) |",
    ]
    for s, m in val["per_source"].items():
        auc = "n/a" if m["auc"] is None else f"{m['auc']:.5f}"
        lines.append(
            f"| {s} | {m['films']} | {_pct(m['accuracy'])} | {auc} | {_pct(m['recall'])} | "
            f"{_pct(m['fpr_unaltered'])} ({m['flagged_unaltered']}/{m['unaltered']}) |"
        )
    lines += ["", extra_md.split("\n", 2)[2].strip(), "", "## Limitations", ""]
    lines += [f"- {x}" for x in (*config.card_limits, *limits)]
    lines += [
        "",
        "Full reports: [evaluation.md](evaluation.md) (confusion matrix, mistakes, every real DICOM file) and "
        "[extra.md](extra.md); machine-readable in evaluation.json and extra.json.",
        "",
        _reproduce(config, name),
    ]
    return "\n".join(lines) + "\n"


def _val_note(config: Config) -> str:
    """The config's own words on which choices looked at val (``val_notes``), or that none did."""
    return " ".join(config.val_notes) or "None did."


def score_card(config: Config, manifest: ModelManifest, report: dict[str, Any]) -> str:
    """A ``score`` detector's card (``atypical``), written at ship time: the task's :class:`CardText` templates
    (purpose, how it works, data, what was measured, limits) filled by its ``card_figures`` from the evaluation
    report, around the manifest's use, threshold and training data."""
    task = get_task(config.task)
    if task.card is None:
        raise ConfigError(f"task: {task.name} is a score detector without card text (Task.card)")
    figures = task.card_figures(config, report, {})
    card = {k: task.card.fill(getattr(task.card, k), figures) for k in ("purpose", "method", "data", "measured")}
    lines = [
        f"# Model card: `{manifest.name}` {manifest.version}",
        "",
        card["purpose"],
        "",
        "## Use",
        "",
        f"- Kind `score`: the ONNX output is one number per film (higher = more {manifest.reason}); the gate "
        f"quarantines with reason `{manifest.reason}` when it is >= **{manifest.threshold:.4f}**.",
        f"- Input `image` float32 (N, 1, {config.preprocessing.size}, {config.preprocessing.size}), preprocessing "
        f"`{config.preprocessing.to_dict()}`"
        + (" (displayed grey, not z-scored: brightness is part of what is measured)."
           if config.preprocessing.normalize == "unit" else "."),
        "",
        "## How it works (all inside model.onnx)",
        "",
        card["method"],
        "",
        "## Data",
        "",
        card["data"],
        "",
        *training_data_table(manifest, "films fitted"),
        "",
        "## Evaluation (val, through decode + preprocess + this ONNX file)",
        "",
        card["measured"],
        "",
        "## Limitations",
        "",
        *(f"- {x}" for x in (*config.card_limits, *(task.card.fill(t, figures) for t in task.card.limits))),
        "",
        "Full report: [evaluation.md](evaluation.md), machine-readable in evaluation.json.",
        "",
        f"Reproduce: `python -m filmgate_training all --config {config.run_path.name}`"
        + (f" after `python -m filmgate_training loso --config {config.run_path.name} --sources all` (the folds "
           "its threshold is recalibrated on)." if config.evaluate.loso_target_fpr is not None else "."),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
