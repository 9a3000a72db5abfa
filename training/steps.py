"""The steps every detector is built by, and ``all`` of them: the one path from a config to ``models/<task>/``.

fit (the training loop, or the task's own :meth:`~filmgate_training.tasks.Task.fit`, e.g. ``atypical``) -> export
(ONNX and the parity check, :func:`filmgate_training.export.export`) -> evaluate (on that very ONNX file,
:func:`evaluate_run`) -> ship (the one manifest construction and install, :func:`filmgate_training.export.ship`).
``python -m filmgate_training all`` runs :func:`build`; ``fit``, ``export``, ``evaluate`` and ``ship`` run one step
each. A task changes what a step does only through its hooks (:class:`filmgate_training.tasks.Task`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from filmgate.manifest import sha256_file
from filmgate_training.config import Config
from filmgate_training.evaluate import evaluate, onnx_runner, write_report
from filmgate_training.export import export, ship
from filmgate_training.tasks import get_task


def fit(config: Config, resume: bool = True, **options: Any) -> Path:
    """The task's own fit (``options`` are its own, e.g. atypical's ``backbone_run``) or the training loop."""
    task = get_task(config.task)
    if task.own_fit:
        return Path(task.fit(config, **options))
    from filmgate_training.train import fit as train

    return train(config, resume=resume)


def evaluate_run(config: Config) -> dict[str, Any]:
    """Threshold and val report of the run's exported ONNX file, written to ``evaluation.{json,md}`` in the run."""
    onnx_path = config.run_path / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"{onnx_path}: run `python -m filmgate_training export` first (evaluation runs the ONNX file)"
        )
    report = evaluate(config, onnx_runner(onnx_path, config.train.threads), {"sha256": sha256_file(onnx_path)})
    js, md = write_report(report, config.run_path)
    print(f"{config.task}: threshold {report['threshold']:.6g}; {summary(report)}")
    print(f"report: {md} and {js}")
    return report


def summary(report: dict[str, Any]) -> str:
    """One line of the headline val figures, for the framework's report or a task's own (``val.by_kind``)."""
    val = report["val"]
    if "pooled" not in val:
        kinds = val.get("by_kind", {})
        return "val flagged by kind: " + ", ".join(f"{k} {m['flagged']}/{m['films']}" for k, m in kinds.items())
    p = val["pooled"]
    return (
        f"val accuracy {p['accuracy']:.5f} AUC {p['auc']:.6f} recall {p['recall']:.5f} unaltered flagged "
        f"{p['flagged_unaltered']}/{p['unaltered']}; worst source {json.dumps(val['worst_source'])}; checks ok: "
        f"{report['checks_ok']}"
    )


def build(config: Config, resume: bool = True, **options: Any) -> Path:
    """fit -> export -> evaluate -> ship; returns the shipped folder."""
    fit(config, resume, **options)
    print(f"exported {export(config)}")
    evaluate_run(config)
    folder = ship(config)
    print(f"shipped {folder}")
    return folder
