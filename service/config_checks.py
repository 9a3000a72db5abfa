"""The constraints the gate's configuration classes declare on their fields (``field(metadata=PORT)``).

Each is field metadata made by :func:`filmgate.typed_config.check`; :func:`filmgate.typed_config.field_errors` walks
the built configuration and reports every value that breaks one, naming the dotted key. They live here, not in
:mod:`filmgate.config`, because the destination and TLS settings are declared beside their code
(:mod:`filmgate.destinations`, :mod:`filmgate.tls`), which the config module imports.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filmgate.record import LAYOUT_FIELDS
from filmgate.typed_config import check, check_by

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash
_AE_MESSAGE = "an AE title is 1-16 printable characters without backslash, got {value!r}"


def _text(hint: str) -> str:
    """``hint`` as literal text in a :func:`check` message (which fills in ``{value}``)."""
    return hint.replace("{", "{{").replace("}", "}}")


def _is_ae_title(value: str) -> bool:
    return bool(_AE_RE.match(value)) and bool(value.strip())


POSITIVE = check(lambda v: v > 0, "must be > 0, got {value}")
NOT_EMPTY = check(bool, "must not be empty")
PORT = check(lambda v: 0 <= v <= 65535, "must be a TCP port 0-65535, got {value}")
AE_TITLE = check(_is_ae_title, _AE_MESSAGE)
AE_TITLE_OR_ANY = check(lambda v: v == "*" or _is_ae_title(v), _AE_MESSAGE)  # "*": any calling AE
AE_TITLES_OR_ANY = check(lambda v: v == "*" or _is_ae_title(v), _AE_MESSAGE, each=True)


def at_least(low: float, hint: str = "") -> dict[str, Any]:
    return check(lambda v: v >= low, f"must be >= {low}{_text(hint)}, got {{value}}")


def between(low: float, high: float, hint: str = "") -> dict[str, Any]:
    return check(lambda v: low <= v <= high, f"must be {low}-{high}{_text(hint)}, got {{value}}")


def one_of(choices: Sequence[str], hint: str = "", *, each: bool = False) -> dict[str, Any]:
    return check(lambda v: v in choices, f"must be one of {_text(str(choices))}{_text(hint)}, got {{value!r}}",
                 each=each)  # fmt: skip


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return bool(re.match(r"^[A-Za-z0-9.-]+$", value))
    return True


HOSTS = check(_is_host, "must be an IP address, a CIDR network or a host name, got {value!r}", each=True)


def template_fields(layout: str) -> list[str]:
    """The ``{names}`` of a layout template; ValueError when it is no template (an unclosed brace)."""
    return [f for _, f, _, _ in string.Formatter().parse(layout) if f is not None]


def relative_path_problems(layout: str) -> list[str]:
    if layout.startswith("/") or ".." in Path(layout).parts:
        return ["must be a relative path inside the destination folder"]
    return []


def _layout_problems(layout: str) -> list[str]:
    try:
        names = template_fields(layout)
    except ValueError as exc:
        return [f"bad template ({exc})"]
    unknown = [f"unknown field {{{n}}}; allowed: {', '.join(LAYOUT_FIELDS)}" for n in names if n not in LAYOUT_FIELDS]
    return unknown + relative_path_problems(layout)


LAYOUT = check_by(_layout_problems)  # a destination's layout: the instance record's fields, inside its folder
