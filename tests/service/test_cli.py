"""The command line as a newcomer meets it: every command and subcommand of `filmgate` and `python -m
filmgate_training` explains itself (options with their help and defaults, at least one example), `serve --help`
names the keys people change most and where the full list is, `--version` names the models, and no internal jargon
reaches the user."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

import pytest

from filmgate import cli
from filmgate.clihelp import add_command
from filmgate_training import cli as training_cli

JARGON = re.compile(r"\bissue[- ]?\d|\bthe seed\b|\bseed paper\b", re.IGNORECASE)


def _commands(parser: argparse.ArgumentParser):
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{parser.prog} {name}", sub


ALL = [*_commands(cli.build_parser()), *_commands(training_cli.build_parser())]


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_every_command_explains_itself(name, parser):
    text = parser.format_help()
    assert parser.description, f"{name}: no description"
    assert "\nexamples:\n  " in text, f"{name}: no example\n{text}"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            assert all(a.help for a in action._choices_actions), f"{name}: a subcommand without a summary"
            continue
        assert action.help, f"{name}: {action.option_strings or action.dest} has no description"
        if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {action.default})" in " ".join(text.split()), f"{name}: default of {action.dest}"
    assert not JARGON.search(text), f"{name}: internal jargon in --help: {JARGON.search(text)}"


def test_serve_help_names_the_most_changed_keys_and_the_full_list():
    text = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for key in ("listener.ae_title", "listener.port", "listener.allow", "destinations", "routes.accept", "http.port"):
        assert key in text, key
    assert "default.yaml" in text and "docs/OPERATIONS.md" in text and "check-config" in text


def test_a_command_without_an_example_is_refused():
    sub = argparse.ArgumentParser().add_subparsers()
    with pytest.raises(ValueError, match="example"):
        add_command(sub, "resend", "send again", examples=[])


def test_version_names_the_models():
    out = subprocess.run([sys.executable, "-m", "filmgate.cli", "--version"], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert out.returncode == 0
    lines = out.stdout.splitlines()
    assert re.match(r"^filmgate \d+\.\d+\.\d+", lines[0]), lines
    models = {m.group(1): m.group(2) for m in (re.match(r"^  model (\S+) (\S+) ", ln) for ln in lines[1:]) if m}
    assert {"orientation", "inversion", "flip", "view", "pediatric", "atypical"} <= set(models), out.stdout
    assert all(re.match(r"^\d+\.\d+\.\d+$", v) for v in models.values()), models


def test_no_internal_jargon_in_model_cards_and_user_docs():
    from tests.helpers import REPO

    docs = [*REPO.glob("models/*/MODEL_CARD.md"), REPO / "README.md", REPO / "training" / "README.md",
            *REPO.glob("docs/*.md")]  # fmt: skip
    found = [f"{p.relative_to(REPO)}: {m.group(0)!r}" for p in docs for m in JARGON.finditer(p.read_text())]
    assert not found, found
