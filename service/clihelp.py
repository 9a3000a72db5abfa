"""One pattern for every command's ``--help``: options with their defaults, a description, and examples.

An operator reads ``--help`` before any document, so each command and subcommand (``filmgate ...`` and
``python -m filmgate_training ...``) says what it does, lists every option with its default and shows at least one
example. Subcommands are added through :func:`add_command` so they all look alike; ``tests/service/test_cli.py``
checks every subcommand of both programs has an example and a described option list.

    p = add_command(sub, "resend", "send dead-lettered instances again",
                    examples=["filmgate resend --destination research-pacs"])
    p.add_argument("--destination", required=True, help="destination name (destinations.<name>)")
"""

from __future__ import annotations

import argparse
import textwrap
from collections.abc import Sequence

WIDTH = 100


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults appended to each option's help ("(default: ...)"), descriptions and epilogs kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # A required option or one without a meaningful default (None, False for a flag) gets no "(default: ...)".
        text = action.help or ""
        if action.required or action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def examples_epilog(examples: Sequence[str], more: str = "") -> str:
    """The epilog block: ``examples:`` then one indented command per line, then ``more`` (a pointer to docs)."""
    lines = ["examples:", *(f"  {e}" for e in examples)]
    if more:
        lines += ["", more]
    return "\n".join(lines)


def make_parser(prog: str, description: str, examples: Sequence[str], more: str = "") -> argparse.ArgumentParser:
    """The top-level parser of a program, in the common format."""
    return argparse.ArgumentParser(
        prog=prog,
        description=textwrap.fill(description, WIDTH),
        epilog=examples_epilog(examples, more),
        formatter_class=HelpFormatter,
    )


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    summary: str,
    *,
    examples: Sequence[str],
    description: str = "",
    more: str = "",
) -> argparse.ArgumentParser:
    """A subcommand: ``summary`` is its line in the parent's list, ``description`` (default: the summary) heads its
    own help, ``examples`` (at least one) and ``more`` (e.g. where the full list of config keys is) close it."""
    if not examples:
        raise ValueError(f"{name}: every command shows at least one example")
    return sub.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description or summary[:1].upper() + summary[1:] + ".", WIDTH),
        epilog=examples_epilog(examples, more),
        formatter_class=HelpFormatter,
    )
