"""One way to turn a parsed settings table (TOML, YAML or JSON) into a frozen dataclass, checking every value.

:func:`convert` checks each key against the dataclass's fields and each value against the field's annotated
type, before the dataclass's own ``__post_init__`` checks ranges and meanings. A wrong type is refused with the
key, the file (or section) and the expected type: ``lr = "fast"``, ``seed = 1.5`` and ``tls = "false"`` are
errors, never quietly used.

Supported annotations: ``bool``, ``int`` (not a bool), ``float`` (an int or a finite float; stored as float),
``str``, ``pathlib.Path`` (from a string), ``None``, unions of these (``X | None``), ``Literal[...]``,
``tuple[X, ...]`` and ``list[X]`` (from a list), ``dict[str, X]`` (from a table). Anything else (a nested
dataclass the caller converts itself, ``Any``) is passed through unchecked.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from edgeml.errors import ConfigError

__all__ = ["check_value", "convert"]

T = TypeVar("T")
_NONE = type(None)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is _NONE:
        return "nothing (omit the key)"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp) if a is not _NONE)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        return f"a list (each {_describe(typing.get_args(tp)[0])})"
    if origin in (dict, Mapping):
        return f"a table (each value {_describe(typing.get_args(tp)[1])})"
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


class _Mismatch(Exception):
    pass


def check_value(value: Any, tp: Any) -> Any:
    """``value`` as the annotation ``tp`` wants it (lists to tuples, strings to paths, ints to floats).

    Raises:
        ConfigError: It is not of that type (the message says what was expected; callers add where).
    """
    try:
        return _check(value, tp)
    except _Mismatch:
        raise ConfigError(f"must be {_describe(tp)}, got {type(value).__name__} {value!r:.60}") from None


def _check(value: Any, tp: Any) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or isinstance(tp, TypeVar):
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise _Mismatch
    if tp is _NONE:
        if value is None:
            return None
        raise _Mismatch
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        items = [_check(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        item = args[1] if len(args) == 2 else Any
        return {k: _check(v, item) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    return value  # a type this helper does not check (a nested dataclass, a callable): the caller's job


def convert(cls: type[T], table: Mapping[str, Any], *, where: str, **extra: Any) -> T:
    """Build the dataclass ``cls`` from ``table``, checking every key and value type.

    Args:
        cls: A dataclass whose field annotations say the expected types.
        table: The parsed settings.
        where: The file and section, for messages (e.g. ``"agent.toml [agent]"``).
        extra: Fields the caller has already built (not checked here: paths resolved, nested objects).

    Raises:
        ConfigError: An unknown key (with the closest known one), a value of the wrong type, a missing
            required key, or the dataclass's own checks.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            raise ConfigError(f"unknown key {key!r} in {where}", hint=f"did you mean {close[0]!r}?" if close
                              else f"valid keys: {', '.join(sorted(fields))}")
        if key in extra:
            continue
        try:
            values[key] = check_value(value, hints.get(key, Any))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {key!r} {exc.message}") from None
    values.update(extra)
    missing = [name for name, f in fields.items() if name not in values and f.init
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: {', '.join(repr(m) for m in missing)} required")
    try:
        return cls(**values)
    except ConfigError as exc:
        if type(exc) is not ConfigError:  # a subclass already says what it refused, in its own terms
            raise
        raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
