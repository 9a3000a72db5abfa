"""A YAML mapping -> a frozen dataclass, with errors that name the key: the one loader behind both configurations.

The gate's configuration (:mod:`filmgate.config`) and a training run's
(:mod:`filmgate_training.config`) are typed, frozen
dataclasses read from YAML. Both need the same things: unknown keys refused with the allowed ones listed, every value
checked against its annotation (``bool``, ``int``, ``float``, ``str``, ``X | None``, ``tuple[X, ...]``,
``Sequence[X]`` (read as a tuple), ``Mapping[str, X]``, ``Any`` (kept as read), nested dataclasses such as
:class:`filmgate.preprocess.PreprocessSpec`), and a message that starts with the dotted key
(``train.steps: must be an integer, got 'many'``) so a typo fails before anything starts.

A field's own constraint (a range, the allowed values, not empty) is declared beside it, as the field's metadata
(``port: int = field(default=104, metadata=check(is_port, "must be a TCP port 0-65535, got {value}"))``), and
:func:`field_errors` checks every one of them in one walk over the built configuration; what is left to a
configuration's own ``validate`` is what no single field can know (one key against another, names that must exist).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """The configuration is invalid. Each message names the key and the fix; several mistakes found in one pass are
    kept together (``errors``, one line each in ``str()``) so the operator sees them all at once."""

    def __init__(self, *messages: str) -> None:
        self.errors: tuple[str, ...] = tuple(line for m in messages for line in str(m).splitlines() if line)
        super().__init__("\n".join(self.errors))

    def prefixed(self, prefix: str) -> ConfigError:
        """The same errors, each line starting with ``prefix`` (the file name)."""
        return ConfigError(*(f"{prefix}{e}" for e in self.errors))


class FrozenMap(Mapping[Any, Any]):
    """A read-only mapping for config values (``policy.thresholds``, ...) that pickles like any plain value.

    A frozen config must not change under the node's feet, so its mappings are read-only; and it travels to the
    worker processes by pickle, which a ``types.MappingProxyType`` cannot do (the node could not start with worker
    processes from a file that set ``policy.thresholds``). This small class is both.
    """

    __slots__ = ("_data",)
    _data: dict[Any, Any]

    def __init__(self, data: Mapping[Any, Any] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Any:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return f"FrozenMap({self._data!r})"

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("FrozenMap is read-only")

    def __reduce__(self) -> tuple[type, tuple[dict[Any, Any]]]:
        return (FrozenMap, (self._data,))


def build(cls: type, data: Any, prefix: str = "", skip: set[str] | None = None) -> Any:
    """``data`` (a mapping) -> ``cls(**...)``; ``prefix`` is the dotted path of ``data`` with a trailing dot.

    Fields named in ``skip`` are neither read nor allowed (the caller builds them itself). A ``ValueError`` or
    ``TypeError`` raised by the dataclass (its ``__post_init__`` checks) becomes a :class:`ConfigError` naming
    the section.
    """
    section = prefix.rstrip(".") or "configuration"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in (skip or set())}
    errors: list[str] = []
    for bad in sorted(str(k) for k in set(data) - set(fields)):
        errors.append(f"{prefix}{bad}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            try:
                kwargs[name] = coerce(hints[name], data[name], f"{prefix}{name}")
            except ConfigError as exc:  # keep going: every mistake of the file is reported at once
                errors.extend(exc.errors)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{prefix}{name}: required key is missing")
    if errors:
        raise ConfigError(*errors)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{section}: {exc}") from exc


def coerce(tp: Any, value: Any, key: str) -> Any:
    """One value checked (and converted where lossless: int -> float, number -> str) against its annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(inner[0], value, key)
    if tp is Any:  # free-form (a manifest's metrics): kept as read
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key + ".")  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return str(value)
    if origin in (tuple, Sequence):
        if isinstance(value, str | Mapping) or not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: must be a list, got {value!r}")
        return tuple(_each([(f"{key}[{i}]", v) for i, v in enumerate(value)], args[0]).values())
    if origin in (Mapping, dict) or origin is typing.get_origin(Mapping[str, float]):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be a mapping, got {value!r}")
        items = _each([(f"{key}.{k}", v) for k, v in value.items()], args[1])
        return FrozenMap({str(k): items[f"{key}.{k}"] for k in value})
    raise ConfigError(f"{key}: unsupported type {tp!r}")  # pragma: no cover - a programming error


def _each(items: list[tuple[str, Any]], tp: Any) -> dict[str, Any]:
    """``coerce`` on each (key, value), collecting every item's errors before raising them together."""
    out: dict[str, Any] = {}
    errors: list[str] = []
    for key, value in items:
        try:
            out[key] = coerce(tp, value, key)
        except ConfigError as exc:
            errors.extend(exc.errors)
    if errors:
        raise ConfigError(*errors)
    return out


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A configuration file's top-level mapping (an empty file is an empty mapping). The one reader of both
    configurations' files: a :class:`ConfigError` starting with the file name when it cannot be read, is not YAML,
    or is not a mapping at the top."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def with_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with each dotted key of ``overrides`` (``train.steps``, from ``--set``) set to its value."""
    out = copy.deepcopy(dict(data))
    for dotted, value in overrides.items():
        node = out
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: {part} is not a mapping")
        node[leaf] = value
    return out


# ------------------------------------------------------------------------------------------------- field constraints


def check(ok: Callable[[Any], bool], message: str, *, each: bool = False) -> dict[str, Any]:
    """Field metadata: the field's value must satisfy ``ok``, or the error is ``<dotted key>: <message>`` with
    ``{value}`` in ``message`` filled in (``{value!r}`` quotes it). With ``each``, every item of a tuple
    (``key[i]``) or value of a mapping (``key.name``) must satisfy it."""
    return check_by(lambda value: () if ok(value) else (message.format(value=value),), each=each)


def check_by(problems: Callable[[Any], Iterable[str]], *, each: bool = False) -> dict[str, Any]:
    """Field metadata for a constraint that says itself what is wrong: ``problems(value)`` yields one message per
    mistake (none when the value is fine), each reported after the dotted key. ``each`` as in :func:`check`."""
    return {"check": problems, "each": each}


def field_errors(obj: Any, prefix: str = "") -> list[str]:
    """Every mistake against the constraints declared on the fields of the dataclass ``obj`` and of the dataclasses
    it holds (nested sections, tuples of them), in field order, each starting with its dotted key. A field whose
    metadata names ``item_key`` (``destinations``) labels its items by that attribute (``destinations.pacs``)
    rather than by position (``[0]``)."""
    errors: list[str] = []
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if "check" in f.metadata:
            items = _items(value, key) if f.metadata["each"] else [(key, value)]
            errors.extend(f"{k}: {problem}" for k, v in items for problem in f.metadata["check"](v))
        if dataclasses.is_dataclass(value):
            errors.extend(field_errors(value, key + "."))
        elif isinstance(value, tuple):
            label = f.metadata.get("item_key")
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    errors.extend(field_errors(item, f"{key}.{getattr(item, label)}." if label else f"{key}[{i}]."))
    return errors


def _items(value: Any, key: str) -> list[tuple[str, Any]]:
    if isinstance(value, Mapping):
        return [(f"{key}.{k}", v) for k, v in value.items()]
    return [(f"{key}[{i}]", v) for i, v in enumerate(value)]
