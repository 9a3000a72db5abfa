"""After ``python -m filmgate_training all --config <name>``: the extra evaluation and model card of a detector.

``python -m filmgate_training finish --config view-ft|flip-hr|pediatric-ft`` runs the task's own
``extra_evaluation`` hook on ``models/<task>/model.onnx``, writes ``extra.{json,md}`` there, adds the task's
``headline`` figures to the manifest's ``metrics`` (through :func:`filmgate.manifest.write_manifest`; the model file
and its sha256 are unchanged) and replaces the generic model card with this detector's own
(:mod:`filmgate_training.detectors.cards`, from the task's ``card`` templates). A task with its own fit and no
extra evaluation (``atypical``, whose card is made at ship time from its evaluation report) is built as ``all``
builds it (:func:`filmgate_training.steps.build`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from filmgate.manifest import load_manifest, write_manifest
from filmgate_training.config import load_config, parse_overrides
from filmgate_training.detectors.cards import classifier_card
from filmgate_training.detectors.extra_eval import run_extra
from filmgate_training.evaluate import onnx_runner
from filmgate_training.tasks import get_task
from filmgate_training.train import load_trained


def finish(name: str, overrides: dict | None = None, backbone_run: Path | None = None) -> None:
    config = load_config(name, overrides)
    task = get_task(config.task)
    if task.own_fit:  # atypical: nothing to add after `all`; `finish` builds it as `all` does
        from filmgate_training.steps import build

        build(config, backbone_run=backbone_run)
        return
    folder = config.models_path / task.name  # a variant's key (pediatric-age) ships as its name
    manifest = load_manifest(folder)
    runner = onnx_runner(folder / manifest.file, config.train.threads)
    extra = run_extra(config, runner, manifest.threshold, folder)
    report = json.loads((folder / "evaluation.json").read_text())
    parity = json.loads((config.run_path / "parity.json").read_text())
    _, blob = load_trained(config.run_path)
    metrics = dict(manifest.metrics) | {"extra": task.headline(extra), "extra_report": "extra.md"}
    manifest = dataclasses.replace(manifest, metrics=metrics)
    write_manifest(folder, manifest)
    extra_md = (folder / "extra.md").read_text()
    (folder / "MODEL_CARD.md").write_text(classifier_card(config, manifest, report, blob, parity, extra, extra_md))
    load_manifest(folder)
    if manifest.quantized is not None and (folder / "int8.json").is_file():  # the card's int8 section, again
        from filmgate_training import quantize

        quantize.write_card(folder, quantize.load_report(folder))
    print((folder / "extra.md").read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m filmgate_training.detectors.finish", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="view, flip, pediatric or atypical")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    parser.add_argument("--backbone-run", type=Path, help="atypical only: the view run folder (default runs/view)")
    args = parser.parse_args(argv)
    finish(args.config, parse_overrides(args.set), args.backbone_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
