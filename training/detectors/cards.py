"""Model cards for flip, view, pediatric, atypical: what each is for, how it was made and measured, what it cannot do.

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
    lines = [
        f"# Model card: `{name}` {manifest.version}",
        "",
        card["purpose"],
        "",
        "## Use",
        "",
        f"- Kind `classifier`; labels {', '.join(f'`{x}`' for x in manifest.labels)}; score = softmax mass of "
        f"{', '.join(f'`{x}`' for x in manifest.positive_labels)}; the gate quarantines with reason "
        f"`{manifest.reason}` when score >= **{manifest.threshold:.6g}**.",
        f"- Input `image` float32 (N, 1, {config.preprocessing.size}, {config.preprocessing.size}), dynamic batch: "
        "the film decoded by `filmgate.decode`, then `filmgate.preprocess` with "
        f"`{config.preprocessing.to_dict()}`. Output `output`: logits.",
        "",
        "## Model",
        "",
        f"FilmNet (training/model.py), widths {list(config.model.widths)}, {blob['parameters']:,} parameters, trained "
        f"from scratch (phases below), served at {config.preprocessing.size} px (the property is global: a whole film "
        "at 128-192 px shows the view, the heart side and the body proportions; it keeps every detector at a few ms "
        "per film on one core). "
        + (MIRROR_SWAP if config.model.mirror_swap else "")
        + f"ONNX opset 17; torch vs onnxruntime max |logit diff| {parity['max_abs_diff']:.2g} on real val films.",
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


def _adult_line(report: dict[str, Any]) -> str:
    per = report["val"]["frontal_per_source"]
    adult = {s: m for s, m in per.items() if not s.startswith("kermany")}
    n = sum(m["films"] for m in adult.values())
    k = sum(m["flagged"] for m in adult.values())
    worst = max(adult, key=lambda s: adult[s]["rate"])
    kids = sum(m["flagged"] for s, m in per.items() if s.startswith("kermany"))
    return (
        f"{k} of {n} val frontal films from adult sources ({100 * k / max(n, 1):.1f}%; worst {worst} "
        f"{adult[worst]['flagged']}/{adult[worst]['films']}) against {kids} of the children's"
    )


def _val_note(config: Config) -> str:
    """The config's own words on which choices looked at val (``val_notes``), or that none did."""
    return " ".join(config.val_notes) or "None did."


def atypical_card(config: Config, manifest: ModelManifest, report: dict[str, Any]) -> str:
    b = report["build"]
    byk = report["val"]["by_kind"]
    lines = [
        f"# Model card: `atypical` {manifest.version}",
        "",
        "An out-of-distribution score: how unlike a clean frontal chest film a film is. It is the second net behind "
        "the classifiers, for films nobody labelled: heavily collimated or zoomed, washed out or nearly blank, "
        "screenshots, and films of the wrong thing that the other detectors miss.",
        "",
        "## Use",
        "",
        f"- Kind `score`: the ONNX output is one number per film (higher = more atypical); the gate quarantines with "
        f"reason `atypical` when it is >= **{manifest.threshold:.4f}**.",
        f"- Input `image` float32 (N, 1, {config.preprocessing.size}, {config.preprocessing.size}), preprocessing "
        f"`{config.preprocessing.to_dict()}` (displayed grey, not z-scored: brightness is part of what is measured).",
        "",
        "## How it works (all inside model.onnx)",
        "",
        "1. From the `unit` input the model rebuilds the view network's z-scored input (padding = all-zero edge rows "
        f"and columns; relative feature difference to the gate's own z-score on real films: "
        f"{b['zscore_rebuild_rel_diff']:.2g}).",
        "2. The trained `view` network (models/view) gives mean-pooled features after its 128-wide and 192-wide "
        "stages; five display statistics are added (mean and log spread of grey, share of near-white and near-black "
        "pixels, share of padding).",
        "3. Two Mahalanobis distances (per dimension; standardised, covariance shrunk 10% towards the identity) to "
        f"the train split's frontal chest films (sources balanced as n^{config.data.source_balance:g}): content (the "
        f"{b['embedding_dims'] - 5} view features) and display (the 5 statistics), kept apart so that 5 numbers "
        f"are not drowned by {b['embedding_dims'] - 5}. Each is divided by its own "
        f"{1 - config.evaluate.target_fpr:.1%} calibration quantile (content "
        f"{b['unit_content']:.3f}, display {b['unit_display']:.3f}); the score is the larger of the two.",
        "",
        "## Data",
        "",
        f"Fitted on {sum(b['fit_films'].values())} frontal chest films of the train split (those the view network "
        "trained on), each both as it came and auto-windowed (0.5th-99.5th percentile, which is how the gate shows a "
        "DICOM file without a window); threshold from "
        f"{sum(b['calibration_films'].values())} held-out train frontal films "
        f"({report['threshold_rule']}). Built on the shipped view network itself "
        f"(`{b['backbone'].get('from', '')}`, view {b['backbone'].get('version', '')}, rebuilt in torch from the ONNX "
        "file, so no run folder is needed). The Gaussian covers every train source, including the hospitals added "
        "on 2026-12-01 that the view network never trained on.",
        "",
        *training_data_table(manifest, "films fitted"),
        "",
        "Synthetic wrong films made from the held-out *train* adult frontal films (what the build judges a design "
        "by): " + ", ".join(f"{k} {_pct(v['rate'])}" for k, v in b.get("calibration_synthetic", {}).items()) + ".",
        "",
        "**Which choices looked at val**: the threshold, the Gaussian and the calibration never did. "
        + _val_note(config),
    ]
    lines += [
        "",
        "## Evaluation (val, through decode + preprocess + this ONNX file)",
        "",
        f"- Frontal chest films flagged: {byk['frontal-chest']['flagged']}/{byk['frontal-chest']['films']} "
        f"({_pct(byk['frontal-chest']['rate'])}); per source in evaluation.md.",
        f"- Also flagged (these are the view detector's job; this is the second net): lateral "
        f"{_pct(byk['lateral-chest']['rate'])}, other radiographs {_pct(byk['other-radiograph']['rate'])}, "
        f"not radiographs {_pct(byk['not-radiograph']['rate'])}.",
        "- Synthetic wrong films made from val adult frontal films (`training/detectors/corrupt.py`): "
        + ", ".join(f"{k} {_pct(v['rate'])}" for k, v in report["synthetic"].items())
        + ".",
        "",
        "## Limitations",
        "",
        f"- The frontal films it flags are adults' ({_adult_line(report)}): washed-out or hazy films and teaching-"
        "file images in black frames with annotations (see 'most atypical' in evaluation.md), i.e. films a "
        "research set may well not want, but good films among them are lost too.",
        "- A distance is not a diagnosis: it flags what is *unusual* relative to these training sources. Frontal "
        "films from a hospital with a very different look may score higher; check the per-source rates on your own "
        "films and override the threshold in the gate's config (`policy.thresholds.atypical`) if needed.",
        "- Depends on models/view: retraining view requires rebuilding this model "
        "(`python -m filmgate_training finish --config atypical`).",
        "",
        "Full report: [evaluation.md](evaluation.md), machine-readable in evaluation.json.",
    ]
    return "\n".join(lines) + "\n"
