"""``python -m filmgate_training``: build the cache, fit, export, evaluate and ship detectors from a YAML config.

python -m filmgate_training tasks                          # the registered tasks
python -m filmgate_training fit --config orientation       # train (resumes from runs/<task>/checkpoint.pt)
python -m filmgate_training export --config orientation    # ONNX + parity check -> runs/<task>/model.onnx
python -m filmgate_training evaluate --config orientation  # threshold + val report (on the ONNX file)
python -m filmgate_training ship --config orientation      # -> models/<task>/ (model, manifest, card, report)
python -m filmgate_training all --config orientation       # all of the above
python -m filmgate_training all --config atypical          # the same steps; its fit is a distance on models/view
python -m filmgate_training finish --config view           # extra evaluation + card (view, flip, pediatric)
python -m filmgate_training gate-report [--docs]           # the val split decided as the gate would
python -m filmgate_training loso --config view --unseen    # leave-one-source-out: the shipped model on sources it
                                                  # never trained on; --sources a,b retrains a fold without each
                                                  # (--set train.steps=300); --card writes the card section
python -m filmgate_training quantize --config flip-hr     # int8 copy of models/<task>/ for CPU (+ parity check);
                                                  # --compare --card: fp32 vs int8 on val and the LOSO sources
python -m filmgate_training graph                        # the graphs several detectors share (view and atypical
                                                  # in one): built from models/, checked, int8, compared
--set train.steps=100 overrides any key (the value is read as YAML).
"""

from __future__ import annotations

import argparse
import sys

from filmgate.clihelp import add_command, make_parser
from filmgate.runtime import setup_logging
from filmgate_training.config import Config, ConfigError, load_config, parse_overrides


def cmd_fit(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.tasks import get_task

    if get_task(config.task).own_fit:  # e.g. atypical: nothing to train; its fit is a step of `all`
        raise ConfigError(f"task {config.task} has no training loop: `python -m filmgate_training all --config "
                          f"{config.task}` fits, exports, evaluates and ships it")  # fmt: skip
    from filmgate_training.steps import fit

    fit(config, resume=not args.restart)


def cmd_export(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.export import export

    print(f"exported {export(config)}")


def cmd_evaluate(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.steps import evaluate_run

    evaluate_run(config)


def cmd_ship(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.export import ship

    print(f"shipped {ship(config)}")


def cmd_all(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.steps import build

    build(config, resume=not args.restart)


def cmd_cache(config: Config, args: argparse.Namespace) -> None:
    from filmgate_training.data import split_train, training_pool
    from filmgate_training.tasks import get_task

    task = get_task(config.task)
    train, _ = split_train(config, task)
    pool = training_pool(config, task, train)
    print(f"cache ready: {len(pool.films)} films {pool.sources()}")


def cmd_loso(args: argparse.Namespace) -> int:
    from filmgate_training import loso
    from filmgate_training.tasks import get_task

    try:
        config = load_config(args.config)
        task = get_task(config.task)
        rows = loso.unseen(config, args.limit, args.min_films) if args.unseen else []
        sources = args.sources.split(",") if args.sources not in ("", "all") else []
        if args.sources == "all":
            sources = loso.eligible_sources(config, task, args.min_films)
        overrides = parse_overrides(args.set)
        lengths = [overrides] if args.short_steps is None else [  # the full-length fold, then the short one beside it
            {k: v for k, v in overrides.items() if k != "train.steps"}, overrides | {"train.steps": args.short_steps}]
        for source in sources:
            for length in lengths:
                rows.append(loso.fold(config, source, length, args.limit))
                loso.merge(task.name, rows[-1:])
        if rows:
            report = loso.merge(task.name, rows)
            print(loso.markdown(report, loso.pooled_val(task.name)))
        if args.card:
            loso.write_card_section(task.name)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from filmgate_training import quantize
    from filmgate_training.tasks import get_task

    try:
        config = load_config(args.config)
        folder = config.models_path / get_task(config.task).name
        if not (args.compare_only or (args.card and not args.compare)):
            print(f"wrote {quantize.quantize_folder(folder)}")
        report = None
        if args.compare or args.compare_only:
            report = quantize.compare(folder, loso_limit=args.loso_limit)
            print(quantize.markdown(report))
            print(f"report: {quantize.write_report(folder, report)}")
        if args.card:  # the comparison just made, or the saved one (refused when of other model files)
            if report is None:
                report = quantize.load_report(folder)
                quantize.write_report(folder, report)
            quantize.write_card(folder, report)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_graph(args: argparse.Namespace) -> int:
    from pathlib import Path

    from filmgate_training import graph

    try:
        graphs = graph.registered()
        names = args.name or list(graphs)
        unknown = sorted(set(names) - set(graphs))
        if unknown:
            raise ConfigError(f"--name: unknown graph(s) {unknown}; registered: {sorted(graphs)}")
        models = Path(args.models)
        for name in names:
            if args.compare_only:
                graph.compare_members(models, graphs[name], loso_limit=args.loso_limit)
            else:
                built = graph.build_graph(models, graphs[name], val_limit=args.val_limit, loso_limit=args.loso_limit)
                print(f"built {built}")
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


COMMANDS = {
    "cache": cmd_cache,
    "fit": cmd_fit,
    "export": cmd_export,
    "evaluate": cmd_evaluate,
    "ship": cmd_ship,
    "all": cmd_all,
}


STEP_HELP = {
    "cache": ("decode the training films once into the cache (runs/cache) and report what it holds",
              "python -m filmgate_training cache --config orientation"),
    "fit": ("train the task's network (resumes from runs/<task>/checkpoint.pt)",
            "python -m filmgate_training fit --config orientation --set train.steps=100"),
    "export": ("export the trained network to ONNX with a parity check -> runs/<task>/model.onnx",
               "python -m filmgate_training export --config orientation"),
    "evaluate": ("choose the threshold and report on val, running the ONNX file as the gate does",
                 "python -m filmgate_training evaluate --config orientation"),
    "ship": ("copy the model, its manifest, card and report to models/<task>/ (what the gate loads)",
             "python -m filmgate_training ship --config orientation"),
    "all": ("fit, export, evaluate and ship in one go (a task without a training loop, atypical, fits its own way)",
            "python -m filmgate_training all --config flip --set train.threads=2"),
}  # fmt: skip
CONFIG_HELP = "YAML file, or the name of one under training/configs/ (e.g. orientation)"
SET_HELP = "override a config key, the value read as YAML; repeatable (e.g. --set train.steps=100)"


def build_parser() -> argparse.ArgumentParser:
    parser = make_parser(
        "python -m filmgate_training",
        "Train, export, evaluate and ship filmgate's detectors from a YAML config (needs the train extra: torch).",
        ["python -m filmgate_training all --config orientation", "python -m filmgate_training SUBCOMMAND --help"],
        "Configs: training/configs/*.yaml; the training guide: training/README.md.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    add_command(sub, "tasks", "list the registered tasks (name, kind, labels, reason)",
                examples=["python -m filmgate_training tasks"])  # fmt: skip
    report = add_command(
        sub, "gate-report", "decide the whole val split as the gate would, with contact sheets",
        examples=["python -m filmgate_training gate-report", "python -m filmgate_training gate-report --docs"],
    )  # fmt: skip
    report.add_argument("--out", help="run folder for the report and contact sheets (default: runs/gate-report)")
    report.add_argument("--models", help="models folder to decide with (default: the repository's models/)")
    report.add_argument("--docs", action="store_true", help="also copy the Markdown/JSON summary to docs/")
    report.add_argument("--sections-only", action="store_true",
                        help="judge nothing: rewrite docs/gate-report.md from docs/gate-report.json with the current "
                             "leave-one-source-out and non-radiograph reports (after loso or non_radiographs)")
    finish = add_command(
        sub, "finish", "extra evaluation and model card for view, flip or pediatric (atypical: as `all`)",
        examples=["python -m filmgate_training finish --config view"],
    )  # fmt: skip
    finish.add_argument("--config", required=True, help=CONFIG_HELP)
    finish.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
    loso = add_command(
        sub, "loso", "leave-one-source-out figures with confidence intervals: the shipped model on sources it never "
        "trained on, and folds retrained without a source",
        examples=["python -m filmgate_training loso --config view-ft --unseen --card",
                  "python -m filmgate_training loso --config atypical --sources all --card",
                  "python -m filmgate_training loso --config view --sources tbx11k --set train.steps=300",
                  "python -m filmgate_training loso --config view --sources nih-cxr14,vqa-rad --short-steps 400 "
                  "--set evaluate.threshold_rule=margin"],
    )  # fmt: skip
    loso.add_argument("--config", required=True, help=CONFIG_HELP)
    loso.add_argument("--sources", default="", help="retrain a fold without each of these (comma-separated; 'all')")
    loso.add_argument("--unseen", action="store_true", help="the shipped model on every source it never trained on")
    loso.add_argument("--limit", type=int, help="at most this many films per held-out source (evenly spaced)")
    loso.add_argument("--min-films", type=int, default=20, help="sources with fewer films are not held out")
    loso.add_argument("--card", action="store_true", help="write the table into models/<task>/MODEL_CARD.md")
    loso.add_argument("--short-steps", type=int, metavar="N",
                      help="also a fold of N steps beside each full-length fold (the config's train.steps): the "
                           "report says whether the short fold agrees (the evidence that short folds may stand in)")
    loso.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP + "; folds only")
    quant = add_command(
        sub, "quantize", "int8 copy of a shipped detector for the CPU (calibrated on train films, checked against "
        "the float model on held-out train films, recorded in its manifest); --compare: both on val and the "
        "leave-one-source-out sources",
        examples=["python -m filmgate_training quantize --config flip-hr",
                  "python -m filmgate_training quantize --config view-ft --compare --card"],
    )  # fmt: skip
    quant.add_argument("--config", required=True, help=CONFIG_HELP + "; the model is models/<task>/")
    quant.add_argument("--compare", action="store_true", help="then compare fp32 and int8 on val and LOSO films")
    quant.add_argument("--compare-only", action="store_true", help="compare the int8 model already shipped")
    quant.add_argument("--card", action="store_true", help="write the comparison into the card and manifest (alone: "
                       "the saved models/<task>/int8.json)")  # fmt: skip
    quant.add_argument("--loso-limit", type=int, help="at most this many films per held-out source (smoke runs)")
    gr = add_command(
        sub, "graph", "the graphs several shipped detectors share (view and atypical): built from their models, "
        "checked against them on val, int8 copy calibrated on train films, compared on val and the "
        "leave-one-source-out sources, recorded in every member's manifest (the ship step of a member runs it)",
        examples=["python -m filmgate_training graph", "python -m filmgate_training graph --name view-atypical "
                  "--compare-only"],
    )  # fmt: skip
    gr.add_argument("--name", action="append", help="a registered graph (default: every one)")
    gr.add_argument("--models", default="models", help="the models folder (default: models)")
    gr.add_argument("--compare-only", action="store_true", help="only the comparison of the graph already built")
    gr.add_argument("--val-limit", type=int, help="at most this many val films per kind in the parity check (smoke)")
    gr.add_argument("--loso-limit", type=int, help="at most this many films per held-out source (smoke runs)")
    for name in COMMANDS:
        summary, example = STEP_HELP[name]
        p = add_command(sub, name, summary, examples=[example])
        p.add_argument("--config", required=True, help=CONFIG_HELP)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=SET_HELP)
        if name in ("fit", "all"):
            p.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging("INFO")  # the gate's process setup: same logging, and pydicom reads films as the gate reads them
    if args.command == "gate-report":
        from filmgate_training.detectors.gate_report import main as gate_report

        extra = [*(["--out", args.out] if args.out else []), *(["--models", args.models] if args.models else [])]
        return gate_report(extra + (["--docs"] if args.docs else []) + (["--sections-only"] if args.sections_only
                                                                         else []))  # fmt: skip
    if args.command == "finish":
        from filmgate_training.detectors.finish import main as finish_main

        return finish_main(["--config", args.config, *(x for kv in args.set for x in ("--set", kv))])
    if args.command == "loso":
        return cmd_loso(args)
    if args.command == "quantize":
        return cmd_quantize(args)
    if args.command == "graph":
        return cmd_graph(args)
    if args.command == "tasks":
        from filmgate_training.tasks import registered

        for name, task in registered().items():
            print(f"{name}: {task.kind}, labels {list(task.labels)}, reason {task.reason}")
        return 0
    try:
        config = load_config(args.config, parse_overrides(args.set))
        COMMANDS[args.command](config, args)
    except (ConfigError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
