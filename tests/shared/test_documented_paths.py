"""The docs name only what exists: every ``filmgate`` subcommand in a code span is the CLI's own, and every
``scripts/...`` and ``bench/...`` file named anywhere in the docs and model cards is in the repository (the cards
once named ``bench/detector_latency``, which is ``bench/detector_latency.py``). The ``python -m filmgate_training``
commands are checked by tests/training/test_documented_commands.py."""

from __future__ import annotations

import argparse
import re

from filmgate.cli import build_parser
from tests.helpers import REPO

DOCS = [REPO / "README.md", REPO / "training" / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted((REPO / "models").glob("*/*.md"))]  # fmt: skip
SPANS = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.S)
COMMAND = re.compile(r"(?:^|[\s/])filmgate ([a-z][a-z-]*)\b")  # `filmgate -p` (a docker option) is not a command
PATH = re.compile(r"(?<![\w./-])((?:scripts|bench)/[\w.-]*\w)")


def _subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_every_filmgate_command_in_the_docs_exists():
    subs, named = _subcommands(), []
    for path in DOCS:
        for block, inline in SPANS.findall(path.read_text()):
            named += [(path.relative_to(REPO), m.group(1)) for m in COMMAND.finditer(block or inline)]
    assert {"serve", "check-config", "inspect", "sweep", "resend"} <= {name for _, name in named}  # the check sees them
    assert [(where, name) for where, name in named if name not in subs] == []


def test_every_script_and_benchmark_the_docs_name_exists():
    named = [(path.relative_to(REPO), m.group(1)) for path in DOCS for m in PATH.finditer(path.read_text())]
    assert len({name for _, name in named}) >= 10  # the check sees them
    assert [(where, name) for where, name in named if not (REPO / name).exists()] == []
