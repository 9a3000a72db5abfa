"""ONNX export with a parity check, and shipping a detector folder (model, manifest, card, evaluation) to models/.

The ONNX file is what the gate runs, so it is checked before it is written: the onnx checker, then torch and
onnxruntime on real val films in every variant (through decode + preprocess), max absolute difference of the
logits printed and bounded by ``evaluate.parity_tolerance``. Evaluation then runs on this very file, and
:func:`ship` refuses a file whose sha256 differs from the one evaluated.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from filmgate.manifest import ModelManifest, load_manifest, sha256_file, write_manifest
from filmgate_training.config import Config
from filmgate_training.data import eval_items, split_train, val_films
from filmgate_training.datasets import LabelledFilm
from filmgate_training.evaluate import onnx_runner, torch_runner
from filmgate_training.films import all_rows
from filmgate_training.tasks import get_task
from filmgate_training.train import load_trained

OPSET = 17


def export_onnx(model: Any, size: int, path: Path) -> None:
    import torch

    model.eval()
    dummy = torch.zeros(1, 1, size, size, dtype=torch.float32)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter is deprecated, still correct
        out = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (dummy,),
            str(out),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes={"image": {0: "batch"}, "output": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter needs no onnxscript; the graph is plain convs
        )
        import onnx

        onnx.checker.check_model(onnx.load(str(out)))
        shutil.copyfile(out, path)


def parity(
    config: Config, model: Any, onnx_path: Path, films: Sequence[LabelledFilm] | None = None
) -> dict[str, Any]:
    """torch vs onnxruntime on real val films (every variant), batch of several and batch of one: the one parity
    check every detector's export passes (``films``: which val films, default the first ``evaluate.parity_films``).
    A ``score`` task's outputs are distances, an ``age`` task's years, not logits: the tolerance is relative to the
    largest output when that is above 1."""
    task = get_task(config.task)
    films = list(films) if films is not None else val_films(config, task)[: config.evaluate.parity_films]
    items = [i for i in eval_items(films, task, config.preprocessing) if not isinstance(i, tuple)]
    if not items:
        raise RuntimeError("parity check: no val film could be decoded")
    x = np.stack([i.input for i in items])
    a = torch_runner(model)(x)
    b = onnx_runner(onnx_path)(x)
    single = onnx_runner(onnx_path)(x[:1])
    diff = float(np.abs(a - b).max())
    diff_single = float(np.abs(a[:1] - single).max())
    agree = float((a.argmax(1) == b.argmax(1)).mean()) if task.kind == "classifier" else None
    result: dict[str, Any] = {
        "films": len(films),
        "inputs": int(len(x)),
        "max_abs_diff": max(diff, diff_single),
        "tolerance": config.evaluate.parity_tolerance,
        "argmax_agreement": agree,
    }
    print(f"parity torch vs onnxruntime on {len(x)} inputs from {len(films)} real val films: "
          f"max |diff| = {result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g})")  # fmt: skip
    relative = task.kind in ("score", "age")
    bound = config.evaluate.parity_tolerance * (max(1.0, float(np.abs(a).max())) if relative else 1.0)
    if not result["max_abs_diff"] <= bound:
        raise RuntimeError(f"ONNX parity failed: max abs diff {result['max_abs_diff']:.3g} > tolerance")
    return result


def fitted(config: Config) -> tuple[Any, dict[str, Any]]:
    """The run's fitted network and its metadata: the task's own (:meth:`Task.load_run`, e.g. ``atypical``) or the
    training loop's ``model.pt``."""
    return get_task(config.task).load_run(config) or load_trained(config.run_path)


def export(config: Config) -> Path:
    """run_dir/model.pt -> run_dir/model.onnx (checked) and run_dir/parity.json."""
    trained, _ = fitted(config)
    model = get_task(config.task).serving_model(trained, config.model.mirror_swap)
    tmp = config.run_path / "model.onnx.tmp"
    export_onnx(model, config.preprocessing.size, tmp)
    result = parity(config, model, tmp)
    final = config.run_path / "model.onnx"
    os.replace(tmp, final)
    result["sha256"] = sha256_file(final)
    (config.run_path / "parity.json").write_text(json.dumps(result, indent=2) + "\n")
    return final


def _training_data(config: Config) -> list[dict[str, Any]]:
    task = get_task(config.task)
    train, calib = split_train(config, task)
    counts = collections.Counter(f.source for f in train)
    cal_counts = collections.Counter(f.source for f in calib)
    licences: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for row in all_rows(config.data.folders):
        licences[row.source][row.licence] += 1
    return [
        {
            "source": s,
            "films": counts[s],
            "calibration_films": cal_counts.get(s, 0),
            "licence": licences[s].most_common(1)[0][0] if licences[s] else "",
        }
        for s in sorted(set(counts) | set(cal_counts))
    ]


def ship(config: Config) -> Path:
    """The one ship path of every detector: the evaluated ONNX model to models/<task>/ with the one manifest
    construction (:func:`manifest_of`), the model card and the evaluation report (:func:`install`)."""
    from filmgate_training.card import model_card
    from filmgate_training.detectors.cards import score_card

    task = get_task(config.task)
    run = config.run_path
    onnx_path = run / "model.onnx"
    report_path = run / "evaluation.json"
    if not onnx_path.is_file() or not report_path.is_file():
        raise FileNotFoundError(f"{run}: needs model.onnx and evaluation.json; run export and evaluate first")
    report = json.loads(report_path.read_text())
    parity_result = json.loads((run / "parity.json").read_text())
    _, blob = fitted(config)
    manifest = manifest_of(config, report, parity_result, blob, sha256_file(onnx_path))
    if config.data.review and task.kind == "classifier":  # a site fine-tune on the review console's corrections
        from filmgate_training.review import check_not_worse  # ships only if not worse on val

        check_not_worse(config.models_path / task.name, dict(manifest.metrics))
    if task.kind == "score":  # every figure of a score detector's card is in its evaluation report
        return install(config, manifest, lambda m: score_card(config, m, report))
    return install(config, manifest, lambda m: model_card(config, m, report, blob, parity_result))


def manifest_of(
    config: Config, report: dict[str, Any], parity_result: dict[str, Any], blob: dict[str, Any], digest: str
) -> ModelManifest:
    """The manifest of an evaluated run: the task's metrics and provenance hooks (:meth:`Task.manifest_metrics`,
    :meth:`Task.manifest_extra`) or the framework's; refuses a model file other than the one evaluated."""
    task = get_task(config.task)
    if report["model"].get("sha256") != digest:
        raise RuntimeError("evaluation.json was made with another model.onnx; run evaluate again")
    metrics = task.manifest_metrics(report) or _metrics(report)
    made = task.manifest_extra(blob) or {
        "architecture": f"FilmNet widths {list(config.model.widths)}",
        "parameters": blob["parameters"],
        "train_steps": blob["steps"],
        "train_seconds": blob["train_seconds"],
        "train_cpu_seconds": blob.get("cpu_seconds"),
        "train_device": blob["device"],
        "train_threads": blob["threads"],
    }
    return ModelManifest(
        name=task.name,
        version=config.version,
        file="model.onnx",
        kind=task.kind,
        reason=task.reason,
        threshold=task.manifest_threshold(float(report["threshold"])),
        preprocessing=config.preprocessing,
        labels=task.labels if task.kind == "classifier" else (),  # a score has no classes to name
        positive_labels=task.positive_labels if task.kind == "classifier" else (),
        sha256=digest,
        description=task.description,
        created=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        metrics=metrics,
        training_data=_training_data(config),
        extra={
            "threshold_rule": report["threshold_rule"],
            "target_fpr": config.evaluate.target_fpr,
            **made,
            "parity_max_abs_diff": parity_result["max_abs_diff"],
            "opset": OPSET,
            "config": config.to_dict(),
        },
    )


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The framework's manifest metrics from its evaluation report."""
    val = report["val"]
    pooled = val["pooled"]
    return {
        "val_films": report["val_films"],
        "accuracy": pooled["accuracy"],
        "auc": pooled["auc"],
        "precision": pooled["precision"],
        "recall": pooled["recall"],
        "fpr_unaltered": pooled["fpr_unaltered"],
        "source_mean": val["source_mean"],
        "worst_source": val["worst_source"],
        "per_source": {
            s: {k: m[k] for k in ("films", "accuracy", "auc", "recall", "fpr_unaltered")}
            for s, m in val["per_source"].items()
        },
        "checks_ok": report["checks_ok"],
        "evaluation": "evaluation.md",
    }


def install(config: Config, manifest: ModelManifest, card: Callable[[ModelManifest], str]) -> Path:
    """The one way a detector lands in ``models/<task>/`` (from :func:`ship`): the run's
    evaluated ``model.onnx`` (its sha256 must be the one ``evaluation.json`` and the manifest record), the run's
    ``evaluation.{json,md}``, the manifest (:func:`filmgate.manifest.write_manifest`) and the card made from it;
    then the folder is loaded as the gate loads it (schema and sha256), the quantise step
    (:func:`filmgate_training.quantize.ship_int8`) adds the int8 model the gate runs on CPU, and every graph it shares
    with other detectors is rebuilt from the members now shipped (:func:`filmgate_training.graph.ship_graphs`)."""
    run = config.run_path
    onnx_path, report_path = run / "model.onnx", run / "evaluation.json"
    if not onnx_path.is_file() or not report_path.is_file():
        raise FileNotFoundError(f"{run}: needs model.onnx and evaluation.json; run export and evaluate first")
    digest = sha256_file(onnx_path)
    if json.loads(report_path.read_text())["model"].get("sha256") != digest or manifest.sha256 != digest:
        raise RuntimeError("evaluation.json was made with another model.onnx; run evaluate again")
    folder = config.models_path / manifest.name
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_path, folder / "model.onnx")
    shutil.copyfile(report_path, folder / "evaluation.json")
    shutil.copyfile(run / "evaluation.md", folder / "evaluation.md")
    write_manifest(folder, manifest)
    (folder / "MODEL_CARD.md").write_text(card(manifest))
    load_manifest(folder)  # what the gate will do: schema and sha256
    from filmgate_training.quantize import ship_int8

    ship_int8(folder)  # the int8 copy the gate runs on CPU, its parity check and comparison, into manifest and card
    from filmgate_training.graph import ship_graphs

    # graphs shared with other detectors, rebuilt or dropped (checked on as many val films as this run's evaluation)
    ship_graphs(config.models_path, manifest.name, config.data.max_val_films)
    return folder
