"""Frozen dataclasses to and from their JSON form, every field checked against its type.

:func:`load` builds a dataclass from decoded JSON once, at the edge: unknown keys are ignored (newer
senders may add optional ones), every known field must have its type (a ``ValueError`` names the field
otherwise), lists become the tuples a field declares and objects the dataclasses it declares. After
that nothing re-parses: the typed object is what every tier passes around.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_FIELDS: dict[type, tuple[str, ...]] = {}
_HINTS: dict[type, dict[str, Any]] = {}
_SCALARS = frozenset({str, int, float, bool, type(None)})


def _fields(cls: type) -> tuple[str, ...]:
    """The field names of dataclass *cls* (looked up once per class)."""
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def load(cls: type[T], data: Any) -> T:
    """Build dataclass *cls* from a JSON object, ignoring unknown keys; every field must have its type
    (ValueError naming the field otherwise: ``NodeInfo.cpu_cores: expected a number, got 'x'``)."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected an object, got {type(data).__name__}")
    names = _fields(cls)
    hints = _hints(cls)
    kept = {}
    for name, value in data.items():
        if name not in names:
            continue
        hint = hints.get(name, Any)
        why = _mismatch(value, hint)
        if why:
            raise ValueError(f"{cls.__name__}.{name}: {why}")
        kept[name] = _convert(value, hint)
    try:
        return cls(**kept)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None


def _convert(value: Any, hint: Any) -> Any:
    """*value* (checked) as the field declares it: a nested dataclass loaded, a list made a tuple."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else load(hint, value)
    if typing.get_origin(hint) is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _mismatch(value: Any, hint: Any) -> str:
    """Why *value* (decoded JSON) is not of type *hint* ("" when it is)."""
    if hint is Any:
        return ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        whys = [_mismatch(value, arg) for arg in args]
        return "" if "" in whys else whys[0]
    if hint is type(None):
        return "" if value is None else f"expected null, got {value!r:.40}"
    if hint is bool:
        return "" if isinstance(value, bool) else f"expected true or false, got {value!r:.40}"
    if hint in (int, float):
        ok = isinstance(value, int if hint is int else int | float) and not isinstance(value, bool)
        return "" if ok else f"expected a number, got {value!r:.40}"
    if hint is str:
        return "" if isinstance(value, str) else f"expected a string, got {value!r:.40}"
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return "" if isinstance(value, dict | hint) else f"expected an object, got {value!r:.40}"
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            return f"expected a list, got {value!r:.40}"
        inner = args[0] if args else Any
        return next((f"[{i}]: {why}" for i, item in enumerate(value) if (why := _mismatch(item, inner))), "")
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected an object, got {value!r:.40}"
        inner = args[1] if len(args) == 2 else Any
        return next((f"[{k!r}]: {why}" for k, item in value.items() if (why := _mismatch(item, inner))), "")
    return ""


def check(value: Any, hint: Any, what: str) -> None:
    """Raise ValueError naming *what* when *value* is not of type *hint*."""
    why = _mismatch(value, hint)
    if why:
        raise ValueError(f"{what}: {why}")


def dump(obj: Any) -> dict[str, Any]:
    """The JSON form of a dataclass. One whose fields all hold scalars (an instance's status, 10,000 of
    them at the root during a burst) is read field by field, without :func:`dataclasses.asdict`'s
    recursion and deep copies (the same result)."""
    out = {}
    for name in _fields(type(obj)):
        value = getattr(obj, name)
        if type(value) not in _SCALARS:
            return dataclasses.asdict(obj)
        out[name] = value
    return out
