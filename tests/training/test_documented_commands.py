"""Every ``python -m filmgate_training ...`` command the docs name exists: the training README, the model cards
(their "Reproduce" lines), docs/, the top README, the training configs and the training package's own docstrings
and messages.

A command is checked as far as its words go: the module runs as ``-m`` (it has a ``__main__`` guard), the
subcommand and each ``--option`` are the CLI's own, and a ``--config`` names a config that loads. ``a|b`` lists
alternatives (each is checked); ``[--docs]`` is optional; words with ``<...>``, ``{...}`` or in capitals
(SUBCOMMAND) or ending in ``/`` (a path built in code) are placeholders and end the check of that command.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import re
from pathlib import Path

import pytest

from filmgate_training.cli import build_parser
from filmgate_training.config import load_config
from tests.helpers import REPO

DOCS = [
    REPO / "README.md",
    REPO / "training" / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "models").glob("*/*.md")),
    *sorted((REPO / "training").rglob("*.py")),
    *sorted((REPO / "training" / "configs").glob("*.yaml")),
]
COMMAND = re.compile(r"python -m (filmgate_training[\w.]*)((?: +[^\s`'\"#);,]+)*)")


def documented() -> list[tuple[str, str, list[str]]]:
    """(where, module, words) for every command named, alternatives expanded."""
    found = []
    for path in DOCS:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in COMMAND.finditer(line):
                words = [w.strip("[]") for w in m.group(2).split()]
                words = list(itertools.takewhile(lambda w: not re.search(r"[<{}>]|^[A-Z_]{3,}$|/$", w), words))
                for choice in itertools.product(*(w.split("|") for w in words)):
                    found.append((f"{path.relative_to(REPO)}:{n}", m.group(1), list(choice)))
    return found


COMMANDS = documented()


def test_the_docs_name_commands():
    """The extraction finds what it must (so the check below cannot pass by finding nothing)."""
    names = {(module, words[0] if words else "") for _, module, words in COMMANDS}
    assert {("filmgate_training", "finish"), ("filmgate_training", "all"), ("filmgate_training", "loso"),
            ("filmgate_training", "gate-report")} <= names  # fmt: skip
    assert sum(where.startswith("models/") and "Reproduce" in _line(where) for where, _, _ in COMMANDS) >= 5


def _line(where: str) -> str:
    path, n = where.rsplit(":", 1)
    return (REPO / path).read_text().splitlines()[int(n) - 1]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize(("where", "module", "words"), COMMANDS, ids=[f"{w}:{' '.join(c)}" for w, _, c in COMMANDS])
def test_documented_command_exists(where, module, words):
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{where}: no module {module}"
    if module != "filmgate_training":
        assert '__name__ == "__main__"' in Path(spec.origin).read_text(), f"{where}: {module} does not run as -m"
        return
    if not words or words[0] in ("--help", "-h"):
        return
    subs = _subparsers(build_parser())
    assert words[0] in subs, f"{where}: no subcommand {words[0]!r} (have {sorted(subs)})"
    options = {s for a in subs[words[0]]._actions for s in a.option_strings}
    for i, word in enumerate(words[1:], 1):
        if word.startswith("-"):
            assert word.split("=")[0] in options, f"{where}: {words[0]} has no option {word} (has {sorted(options)})"
        if words[i - 1] == "--config":
            load_config(word)  # raises naming the file when the config does not exist
