"""Model cards for flip, view, pediatric, atypical: what each is for, how it was made and measured, what it cannot do.

The framework's card (:mod:`filmgate_training.card`) describes self-supervised
orientation/inversion models; these detectors
need their own words (labelled data, how few laterals there are, the pediatric shortcut, a distance score), so the
card is written here from the same manifest and reports plus :mod:`filmgate_training.detectors.extra_eval`.
"""

from __future__ import annotations

from typing import Any

from filmgate.manifest import ModelManifest
from filmgate_training.card import training_data_table
from filmgate_training.config import Config

MIRROR_SWAP = (
    "The exported graph is mirror-consistent (`filmgate_training.model.MirrorSwap`): it runs the network on the film "
    "and on its "
    "mirror image and averages the logits with the second pair swapped, so a film and its mirror image always get "
    "complementary scores and the network's own left-right biases cancel (two passes per film). "
)

PURPOSE = {
    "view": (
        "Keeps everything that is not a frontal chest radiograph out of the accept path: lateral chest films, "
        "radiographs of other body parts (knee, spine, skull, hand, pelvis, abdomen, teeth...), and images that are "
        "not radiographs (CT, MR, ultrasound slices). DICOM tags cannot do this: BodyPartExamined is wrong in about "
        "15% of images. The predicted class (the arg-max label) goes into the sidecar."
    ),
    "flip": (
        "Finds frontal chest films displayed as a mirror image (patient's left on the viewer's left). Mirrored films "
        "are the commonest orientation error in the literature and the one that generalises worst across hospitals."
    ),
    "pediatric": (
        "Finds children's films when the header gives no usable age. The gate's metadata rule (PatientAge, or birth "
        "and study dates) stays the first line; this image model is for films whose age is missing or implausible."
    ),
}

DATA = {
    "view": (
        "Labelled by `kind` in labels.csv: every `frontal-chest` film (adult and child) is the negative class; "
        "`lateral-chest`, `other-radiograph` and `not-radiograph` films are the three positive classes. Classes are "
        "sampled by share (frontal 40%, lateral 20%, other radiograph 25%, not a radiograph 15%; "
        "`training/detectors/view.py`), sources balanced within a class. Only 21 lateral films are in the training "
        "part of the train split, so each is seen hundreds of times and never twice alike: mirrored (a lateral may "
        "face either way), tilted, cropped, stretched, collimated, re-windowed, with burned-in markers, as a "
        "low-resolution JPEG copy. Frontal films are mirrored too, so the view model ignores flips."
    ),
    "flip": (
        "Self-supervised: every frontal chest film of the train split (adult and child) shown as it came (`normal`) "
        "or mirrored left-right (`flipped`), chosen at random per sample. Burned-in markers are drawn on the film "
        "before the mirror (so their glyphs mirror with it, as on a really mirrored film) and viewer overlays after "
        "it (readable on both classes), so readable text alone is no clue."
    ),
    "pediatric": (
        "Labelled by `pediatric` in labels.csv (yes < 18 years): frontal "
        "chest films plus the `spine` collection, which holds children and adults from one source (so 'which "
        "hospital' cannot explain its labels). Classes sampled 50/50, sources balanced within a class. Against the "
        "resolution shortcut (`kermany` is a 224 px square copy), 35% of samples of *both* classes are turned into "
        "160-256 px JPEG copies (half of them stretched to a square) before the usual augmentation."
    ),
}

MEASURED = {
    "view": (
        "Recall with so few laterals: the val split has 11 real lateral films; all of them are scored as they came "
        "and the exact one-sided 95% lower bound of the rate is given (11/11 proves only >= 76%). To say more, each "
        "val lateral is also scored in 20 realistic variants (mirrored, tilted, cropped, re-windowed, markers, "
        "noise): a robustness figure, not an independent sample. Other radiographs (224) and non-radiographs (73) "
        "give tighter bounds. The 2 lateral films of the calibration holdout were not trained on either."
    ),
    "flip": (
        "Every val frontal film is scored as it came and mirrored; accuracy and unaltered films flagged, per source."
    ),
    "pediatric": (
        "Accuracy per source on the val frontal chest films (the only films on which the gate uses this model's "
        "verdict; the spine films it also trained on are shown by age below), and the shortcut checks: adult val "
        "films made into 224 px and 160 px square JPEG copies (what the pediatric `kermany` copy looks like) must "
        "stay adult; children's full-resolution films as 224 px copies must stay children."
    ),
}

LIMITS = {
    "view": [
        "34 real lateral films exist here (21 trained on): lateral films from other hospitals, decubitus or "
        "oblique views, and unusual body parts may be missed. The atypical detector is the second net.",
        "Frontal films of children are `frontal-chest` for this model (the pediatric detector handles age).",
        "1.0.0 held back 5 of the 201 adult val frontal films (2.5%; 0 of 1,205 children's): kermany, one hospital, "
        "was half of its frontal samples and its threshold sat at the edge of the held-out frontal films (0.09). "
        "1.1.0 was fine-tuned with the sources weighted evenly and its threshold follows the `margin` rule (middle of "
        "the gap between held-out frontal and held-out other films, chosen on held-out train films only; the *rule* "
        "was changed after 1.0.0's val figures were seen). On val it flags one frontal film, the NIH film stored "
        "upside down (which is not an upright frontal film; `orientation` quarantines it too), and lets one other "
        "film through: a whole-spine PA film of a 16-year-old that shows the whole chest (score 0.38). "
        "`policy.thresholds.view` in the gate's config moves this trade-off.",
    ],
    "flip": [
        "**Per source, one source stays under 98%**: vqa-rad 95.2% (21 films: a teaching film labelled 'Hx of situs "
        "inversus', heart on the right; the model calls the film as it came 'flipped' and its mirror 'normal', which "
        "is right about the anatomy but counts as two errors here). nih-cxr14 is at 98.3%: its errors are both films "
        "of one patient with a white-out right hemithorax and the mediastinum pulled right (the anatomy looks "
        "mirrored; only the small 'L' marker tells). Every other source is 98.8-100%.",
        "Mirroring is synthetic; dextrocardia, situs inversus and films with one hemithorax opaque are real "
        "'mirror-looking' films that will be flagged (a person should look at them anyway).",
        "The NIH film stored upside down is left out of the figures (as for orientation and inversion): turned "
        "180 degrees is mirrored *and* upside down, and the gate quarantines it as rotated.",
        "1.2.0 runs at 192 px (1.1.0: 128 px), about 3.6 ms per film on one core instead of 1.5. A mirror-consistent "
        "export (`model.mirror_swap`: film and mirror image, logits swapped and averaged) was also evaluated: no "
        "better on the held-out train films (99.64% against 99.56%) nor on val (99.07% against 99.22%) at twice the "
        "cost, so it is not shipped.",
        "Most val films are pediatric (kermany); adult sources have 21-89 val films each.",
    ],
    "pediatric": [
        "Almost all children's chest films come from one hospital (Guangzhou, ages 1-5). The guards above reduce "
        "but cannot rule out that the model partly recognises that hospital; teenagers are nearly absent from the "
        "chest films, so children of 12-17 may be called adult. Use the metadata rule wherever the header has an age.",
        "Adult films without an age (vqa-rad, openi, radiopaedia) were not trained on; their rate is reported.",
        "The model is for frontal chest films. On the `spine` collection (not chest films; trained on only to break "
        "the hospital shortcut) it calls most films children, adults of 18-35 included: accuracy about 84% on its 49 "
        "val films (table above). In the gate this never decides a spine film: the view detector quarantines it as "
        "`not-frontal-chest`, and `policy.outranks` drops the image model's `pediatric` there (a header age still "
        "counts).",
    ],
}


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
    val = report["val"]
    p = val["pooled"]
    lines = [
        f"# Model card: `{name}` {manifest.version}",
        "",
        PURPOSE[name],
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
        DATA[name] + _data_note(name),
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
        MEASURED[name],
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
    lines += [f"- {x}" for x in (*config.card_limits, *LIMITS[name])]
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


def _data_note(name: str) -> str:
    """What the task's code says about its data, read from the code (not restated here)."""
    if name != "pediatric":
        return ""
    from filmgate_training.detectors.pediatric import ADULT_SOURCES

    return (f" Adult collections without ages, labelled adult by source: {', '.join(f'`{s}`' for s in ADULT_SOURCES)} "
            "(training/detectors/pediatric.py).")  # fmt: skip


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
        "the train split's frontal chest films (sources balanced as n^0.5): content (the "
        f"{b['embedding_dims'] - 5} view features) and display (the 5 statistics), kept apart so that 5 numbers "
        "are not drowned by 320. Each is divided by its own 99.5% calibration quantile (content "
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
