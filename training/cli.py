"""``python -m filmgate_training``: build the cache, fit, export, evaluate and ship detectors from a YAML config.

python -m filmgate_training tasks                          # the registered tasks
python -m filmgate_training fit --config orientation       # train (resumes from runs/<task>/checkpoint.pt)
python -m filmgate_training export --config orientation    # ONNX + parity check -> runs/<task>/model.onnx
python -m filmgate_training evaluate --config orientation  # threshold + val report (on the ONNX file)
python -m filmgate_training ship --config orientation      # -> models/<task>/ (model, manifest, card, report)
python -m filmgate_training all --config orientation       # all of the above
python -m filmgate_training finish --config view           # issue-4 extra evaluation + card (view, flip, pediatric);
                                                  # --config atypical builds the atypical score from runs/view
python -m filmgate_training gate-report [--docs]           # the val split decided as the gate would (issue 4, item 6)
--set train.steps=100 overrides any key (the value is read as YAML).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

import yaml

from filmgate_training.config import Config, ConfigError, load_config


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. train.steps=100")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def cmd_fit(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.train import fit

    fit(config, resume=not args.restart)


def cmd_export(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.export import export

    print(f"exported {export(config)}")


def cmd_evaluate(config: Config, args: argparse.Namespace) -> None:
    from filmgate.manifest import sha256_file
    from filmgate_training.evaluate import evaluate, onnx_runner, write_report

    onnx_path = config.run_path / "model.onnx"
    if not onnx_path.is_file():
        raise FileNotFoundError(
            f"{onnx_path}: run `python -m filmgate_training export` first (evaluation runs the ONNX file)"
        )
    report = evaluate(config, onnx_runner(onnx_path, config.train.threads), {"sha256": sha256_file(onnx_path)})
    js, md = write_report(report, config.run_path)
    p = report["val"]["pooled"]
    print(
        f"{config.task}: threshold {report['threshold']:.6g}; val accuracy {p['accuracy']:.5f} AUC {p['auc']:.6f} "
        f"recall {p['recall']:.5f} unaltered flagged {p['flagged_unaltered']}/{p['unaltered']}; "
        f"worst source {json.dumps(report['val']['worst_source'])}; checks ok: {report['checks_ok']}"
    )
    print(f"report: {md} and {js}")


def cmd_ship(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.export import ship

    print(f"shipped {ship(config)}")


def cmd_all(config: Config, args: argparse.Namespace) -> None:
    for step in (cmd_fit, cmd_export, cmd_evaluate, cmd_ship):
        step(config, args)


def cmd_cache(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.data import split_train, training_pool
    from filmgate_training.tasks import get_task

    task = get_task(config.task)
    train, _ = split_train(config, task)
    pool = training_pool(config, task, train)
    print(f"cache ready: {len(pool.films)} films {pool.sources()}")


COMMANDS = {
    "cache": cmd_cache,
    "fit": cmd_fit,
    "export": cmd_export,
    "evaluate": cmd_evaluate,
    "ship": cmd_ship,
    "all": cmd_all,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m filmgate_training", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tasks", help="list the registered tasks")
    report = sub.add_parser("gate-report", help="the whole val split decided as the gate would (issue 4)")
    report.add_argument("--out", help="run folder for the report and contact sheets (default runs/gate-report)")
    report.add_argument("--models", help="models folder (default models/)")
    report.add_argument("--docs", action="store_true", help="also copy the Markdown/JSON summary to docs/")
    finish = sub.add_parser("finish", help="issue-4 evaluation and card for view/flip/pediatric; builds atypical")
    finish.add_argument("--config", required=True)
    finish.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    for name in COMMANDS:
        p = sub.add_parser(name)
        p.add_argument("--config", required=True, help="YAML file, or a name under training/configs/")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
        if name in ("fit", "all"):
            p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "gate-report":
        from filmgate_training.detectors.gate_report import main as gate_report

        extra = [*(["--out", args.out] if args.out else []), *(["--models", args.models] if args.models else [])]
        return gate_report(extra + (["--docs"] if args.docs else []))
    if args.command == "finish":
        from filmgate_training.detectors.finish import main as finish_main

        return finish_main(["--config", args.config, *(x for kv in args.set for x in ("--set", kv))])
    if args.command == "tasks":
        from filmgate_training.tasks import registered

        for name, task in registered().items():
            print(f"{name}: {task.kind}, labels {list(task.labels)}, reason {task.reason}")
        return 0
    try:
        config = load_config(args.config, _overrides(args.set))
        COMMANDS[args.command](config, args)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
