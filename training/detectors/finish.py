"""After ``python -m filmgate_training all --config <name>``: the extra evaluation and model card of a detector.

``python -m filmgate_training.detectors.finish --config view|flip|pediatric`` runs
:mod:`filmgate_training.detectors.extra_eval` on ``models/<name>/model.onnx``, writes ``extra.{json,md}`` there, adds
the headline figures to the manifest's ``metrics`` (through :func:`filmgate.manifest.write_manifest`; the model file
and its sha256 are unchanged) and replaces the generic model card with this detector's own
(:mod:`filmgate_training.detectors.cards`). ``--config atypical`` builds, evaluates and ships the atypical score
(:mod:`filmgate_training.detectors.atypical_build`).
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
from filmgate_training.train import load_trained


def headline(name: str, extra: dict) -> dict:
    if name == "view":
        return {
            "kept_out_by_kind": {k: v["rate"] for k, v in extra["by_kind"].items() if k != "frontal-chest"},
            "kept_out_lower95_by_kind": {k: v["lower95"] for k, v in extra["by_kind"].items() if k != "frontal-chest"},
            "frontal_flagged": extra["by_kind"]["frontal-chest"]["rate"],
            "lateral_variants_kept_out": extra["lateral_variants"]["rate"],
            "frontal_mirrored_flagged": extra["frontal_mirrored"]["rate"],
        }
    if name == "pediatric":
        return {"shortcut_checks": {k: v["rate"] for k, v in extra["checks"].items()}}
    if name == "flip":
        return {"per_source_accuracy": {k: v["accuracy"] for k, v in extra["per_source"].items()}}
    return {}


def finish(name: str, overrides: dict | None = None, backbone_run: Path | None = None) -> None:
    config = load_config(name, overrides)
    if config.task == "atypical":
        from filmgate_training.detectors.atypical_build import run

        print(f"shipped {run(config, backbone_run)}")
        return
    folder = config.models_path / config.task
    manifest = load_manifest(folder)
    runner = onnx_runner(folder / manifest.file, config.train.threads)
    extra = run_extra(config, runner, manifest.threshold, folder)
    report = json.loads((folder / "evaluation.json").read_text())
    parity = json.loads((config.run_path / "parity.json").read_text())
    _, blob = load_trained(config.run_path)
    metrics = dict(manifest.metrics) | {"extra": headline(config.task, extra), "extra_report": "extra.md"}
    manifest = dataclasses.replace(manifest, metrics=metrics)
    write_manifest(folder, manifest)
    extra_md = (folder / "extra.md").read_text()
    (folder / "MODEL_CARD.md").write_text(classifier_card(config, manifest, report, blob, parity, extra, extra_md))
    load_manifest(folder)
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
