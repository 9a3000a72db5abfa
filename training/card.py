"""The model card (``models/<name>/MODEL_CARD.md``), written from the config, manifest and evaluation report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from filmgate.manifest import ModelManifest
from filmgate_training.config import Config
from filmgate_training.evaluate import _num, _pct
from filmgate_training.tasks import get_task


def upper95(k: int, n: int) -> float | None:
    """One-sided 95% upper confidence bound of a rate seen k times in n (exact for k = 0, Wilson otherwise)."""
    if n == 0:
        return None
    if k == 0:
        return 1.0 - 0.05 ** (1.0 / n)
    z = 1.645
    p = k / n
    centre = p + z * z / (2 * n)
    margin = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5)
    return (centre + margin) / (1 + z * z / n)


def training_data_table(manifest: ModelManifest, films_column: str = "train films") -> list[str]:
    """The model card's table of sources: films used, films held out for the threshold, licence."""
    lines = [f"| source | {films_column} | calibration films | licence |", "| --- | --- | --- | --- |"]
    for d in manifest.training_data:
        lines.append(f"| {d['source']} | {d['films']} | {d['calibration_films']} | {d['licence']} |")
    return lines


def model_card(
    config: Config, manifest: ModelManifest, report: dict[str, Any], blob: dict[str, Any], parity: dict[str, Any]
) -> str:
    val = report["val"]
    p = val["pooled"]
    aug = config.augment
    task = get_task(config.task)
    nuisance = getattr(task, "nuisance", ())  # synthetic tasks only
    nuisance_p = getattr(task, "nuisance_p", 0.0)
    lines = [
        f"# Model card: `{manifest.name}` {manifest.version}",
        "",
        manifest.description,
        "",
        "## Use",
        "",
        f"- Kind `{manifest.kind}`; labels {', '.join(f'`{x}`' for x in manifest.labels)}; score = softmax mass of "
        f"{', '.join(f'`{x}`' for x in manifest.positive_labels)}; the gate quarantines with reason "
        f"`{manifest.reason}` when score >= **{manifest.threshold:.6g}**.",
        f"- Input `image` float32 (N, 1, {config.preprocessing.size}, {config.preprocessing.size}), dynamic batch: "
        f"the film decoded by `filmgate.decode` (grey [0, 1] as displayed), then `filmgate.preprocess` with "
        f"`{config.preprocessing.to_dict()}`. Output `output`: logits.",
        "- Intended for frontal chest radiographs (that is what it was trained on). On other films its output means "
        "little: the view detector is responsible for keeping those out.",
        "",
        "## Model",
        "",
        f"FilmNet (training/model.py): strided 3x3 conv stages with one residual block each, widths "
        f"{list(config.model.widths)}, global average pooling, linear head; {blob['parameters']:,} parameters, "
        f"trained from scratch (no pretrained weights). ONNX opset 17; torch vs onnxruntime max |logit diff| "
        f"{parity['max_abs_diff']:.2g} on {parity['inputs']} inputs from real val films.",
        "",
        f"**Input size {config.preprocessing.size} px, letterboxed, z-scored.** Rotation and inversion are global "
        "properties of a film (where the shoulders, diaphragm, mediastinum are; whether bone is white): they need "
        f"no fine detail: {config.preprocessing.size} px keeps the whole film in view at a fraction of the cost of "
        "256 px, which is what lets every detector run on every film on one CPU core. Letterboxing keeps the aspect "
        "ratio (real "
        "information) but aspect is augmented so it is never the only cue; z-scoring per film removes exposure and "
        "window differences between hospitals.",
        "",
        "**One model per problem** (following Oakden-Rayner, 2018): each detector is a fraction of a millisecond to "
        "about 1.5 ms per film on one core (bench/detector_latency.py), so a shared backbone would save little time, "
        "while separate models can be retrained, thresholded and replaced independently, and a mistake in one task "
        "cannot leak into another.",
        "",
        "## Training",
        "",
        f"- Films: `frontal-chest` films of the `train` split of ../shared/data (never `val`); "
        f"{config.data.calibration_fraction:.0%} of train patients held out to choose the threshold.",
        *(
            [f"- Sources left out (`data.exclude_sources`): {', '.join(config.data.exclude_sources)}."]
            if config.data.exclude_sources
            else []
        ),
        *([f"- Which choices looked at val: {' '.join(config.val_notes)}"] if config.val_notes else []),
        "- Labels made synthetically from each film by the label transform applied to the decoded [0, 1] film, "
        "between the film augmentations (which turn with it) and the display augmentations (which every class "
        "gets alike).",
        f"- Augmentation: crop/zoom (p {aug.p_crop}, >= {aug.crop_min_side:.0%} of each side), aspect stretch "
        f"(p {aug.p_aspect}, up to x{aug.aspect_max}), tilt (p {aug.p_tilt}, +-{aug.tilt_degrees:g} deg), "
        f"collimation (p {aug.p_collimation}), borders (p {aug.p_border}), burned-in markers and text turned with "
        f"the film (p {aug.p_text_film}) and upright overlays (p {aug.p_text_overlay}), window (p {aug.p_window}), "
        f"gamma (p {aug.p_gamma}, up to {aug.gamma_max}), contrast (p {aug.p_contrast}), blur (p {aug.p_blur}), "
        f"noise (p {aug.p_noise}, sigma up to {aug.noise_max}), padding (p {aug.p_pad}).",
        *(
            [
                f"- Nuisance faults: {nuisance_p:.0%} of training films of every class also get another "
                f"detector's fault ({', '.join(fn.__name__.lstrip('_') for fn in nuisance)}), so that this "
                "detector's answer does not depend on it.",
            ]
            if nuisance
            else []
        ),
        f"- Sources balanced: a source of n films is sampled in proportion to n^{config.data.source_balance} "
        "(the pediatric 224-px `kermany` copies would otherwise be ~80% of all samples).",
        f"- {blob['steps']} steps of batch {config.train.batch_size}, AdamW lr {config.train.lr} (warm-up, cosine), "
        f"seed {config.train.seed}; {blob['train_seconds'] / 60:.1f} min wall on {blob['device']} with "
        f"{blob['threads']} threads, {blob.get('cpu_seconds', float('nan')) / 60:.1f} CPU-minutes (the wall time "
        "on idle cores: the build machine's 2 cores were shared with other training runs); cache load or build "
        f"{blob.get('cache_seconds', 0):.0f} s.",
        "",
        *training_data_table(manifest),
    ]
    lines += [
        "",
        "## Evaluation (val split, every film in every variant, through decode + preprocess + this ONNX file)",
        "",
        f"Threshold {manifest.threshold:.6g}: {report['threshold_rule']}.",
        "",
        "| | accuracy | AUC | recall | unaltered flagged |",
        "| --- | --- | --- | --- | --- |",
        f"| pooled ({report['val_films']} films) | {_pct(p['accuracy'])} | {_num(p['auc'])} | {_pct(p['recall'])} | "
        f"{_pct(p['fpr_unaltered'])} ({p['flagged_unaltered']}/{p['unaltered']}) |",
        f"| 95% upper bound of the unaltered-flagged rate | | | | "
        f"{_pct(upper95(p['flagged_unaltered'], p['unaltered']))} |",
        f"| source mean | {_pct(val['source_mean']['accuracy'])} | {_num(val['source_mean']['auc'])} | "
        f"{_pct(val['source_mean']['recall'])} | {_pct(val['source_mean']['fpr_unaltered'])} |",
    ]
    for s, m in val["per_source"].items():
        lines.append(
            f"| {s} ({m['films']} films) | {_pct(m['accuracy'])} | {_num(m['auc'])} | {_pct(m['recall'])} | "
            f"{_pct(m['fpr_unaltered'])} ({m['flagged_unaltered']}/{m['unaltered']}) |"
        )
    lines += [
        "",
        "Worst source (of those with at least 5 val films): "
        + "; ".join(
            f"{k} {v['source']} ({_num(v['value']) if k == 'auc' else _pct(v['value'])})"
            for k, v in val["worst_source"].items()
        )
        + ".",
        "",
        "Real films with a known outcome:",
        "",
    ]
    for ch in report["checks"]:
        lines.append(
            f"- `{ch['path']}` ({ch['why']}): expected {'flagged' if ch['expected_flagged'] else 'not flagged'}, "
            f"score {_num(ch.get('score'), 4)}, {'ok' if ch.get('ok') else '**FAILED**'}"
        )
    lines += [
        "",
        *(
            [
                "Left out of training, calibration and the figures above because the row is wrong for this task "
                "(each is also a check above):",
                "",
                *[f"- `{e.path}`: {e.why}" for e in config.data.exclude],
                "",
            ]
            if config.data.exclude
            else []
        ),
        "Full report: [evaluation.md](evaluation.md) (confusion matrix, per-variant figures, mistakes, every real "
        "DICOM file), machine-readable in evaluation.json.",
        "",
        "## Limitations",
        "",
        *(f"- {x}" for x in config.card_limits),
        "- Rotated and inverted films are synthetic (one val film is really stored upside down, see above). Real "
        "faults can differ (e.g. a film rotated and then re-windowed by another system).",
        "- Sources with few val films (openi, radiopaedia-trauma) give coarse per-source numbers; films from "
        "hospitals not in ../shared/data are the real test of generalisation.",
        "- The val films are mostly pediatric (kermany); adult sources have 21-89 val films each, so a per-source "
        "false-positive rate below ~1% cannot be demonstrated for them individually.",
        "",
        "Reproduce: `python -m filmgate_training all --config training/configs/" + f"{manifest.name}.yaml`.",
    ]
    return "\n".join(lines) + "\n"


def put_section(card: Path, begin: str, end: str, section: str) -> None:
    """Write ``section`` into the model card between the markers ``begin`` and ``end``: replaced on each run, or
    added before "## Limitations" (at the end when there is none) the first time. The LOSO table and the int8
    comparison are kept in their cards this way."""
    text = card.read_text()
    block = f"{begin}\n{section}\n{end}"
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        marker = "\n## Limitations"
        text = text.replace(marker, f"\n{block}\n{marker}", 1) if marker in text else text + "\n" + block + "\n"
    card.write_text(text)
