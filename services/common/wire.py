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
from collections.abc import Callable
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
    plan = _plan(cls)
    kept = {}
    for name, value in data.items():
        field = plan.get(name)
        if field is None:
            continue
        check, convert = field
        if check is not None and (why := check(value)):
            raise ValueError(f"{cls.__name__}.{name}: {why}")
        kept[name] = convert(value) if convert is not None else value
    try:
        return cls(**kept)
    except TypeError as exc:
        raise ValueError(f"{cls.__name__}: {exc}") from None


Check = Callable[[Any], str]
Convert = Callable[[Any], Any]
_PLANS: dict[type, dict[str, tuple[Check | None, Convert | None]]] = {}


def _plan(cls: type) -> dict[str, tuple[Check | None, Convert | None]]:
    """Per field of *cls*, how to check a decoded value and what to make of it (worked out once per class:
    10,000 statuses a second pass through here at a cluster of 1,000 workers)."""
    plan = _PLANS.get(cls)
    if plan is None:
        hints = _hints(cls)
        plan = _PLANS[cls] = {name: (_checker(hints.get(name, Any)), _converter(hints.get(name, Any)))
                              for name in _fields(cls)}
    return plan


def _scalar(kind: type, word: str, exclude_bool: bool = False) -> Check:
    def check(value: Any) -> str:
        ok = isinstance(value, kind) and not (exclude_bool and isinstance(value, bool))
        return "" if ok else f"expected {word}, got {value!r:.40}"
    return check


# The scalar hints' checks, shared by the per-class plans and :func:`_compile`.
_SCALAR_CHECKS: dict[Any, Check] = {
    str: _scalar(str, "a string"),
    int: _scalar(int, "a number", exclude_bool=True),
    float: _scalar(int | float, "a number", exclude_bool=True),  # type: ignore[arg-type]
    bool: _scalar(bool, "true or false"),
    type(None): _scalar(type(None), "null"),
}


def _checker(hint: Any) -> Check | None:
    """The check of a field of type *hint* (None: anything goes)."""
    return None if hint is Any else _compiled(hint)


def _converter(hint: Any) -> Convert | None:
    """What a checked value becomes: a nested dataclass loaded, a list made the tuple the field declares."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        nested = hint
        return lambda value: value if isinstance(value, nested) else load(nested, value)
    optional = [a for a in typing.get_args(hint) if isinstance(a, type) and dataclasses.is_dataclass(a)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(optional) == 1:  # ``Nested | None``
        nested_or_none = optional[0]
        return lambda value: load(nested_or_none, value) if isinstance(value, dict) else value
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if args and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):  # ``tuple[Nested, ...]``
            item = args[0]
            return lambda value: tuple(v if isinstance(v, item) else load(item, v) for v in value)
        return lambda value: tuple(value) if isinstance(value, list) else value
    return None


_COMPILED: dict[Any, Check] = {}


def _compiled(hint: Any) -> Check:
    """The check of *hint*, worked out once per hint: the typing introspection is done here, not per value."""
    made = _COMPILED.get(hint)
    if made is None:
        made = _COMPILED[hint] = _compile(hint)
    return made


def _compile(hint: Any) -> Check:
    if hint is Any:
        return lambda value: ""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        options = [_compiled(arg) for arg in args]

        def either(value: Any) -> str:
            whys = [option(value) for option in options]
            return "" if "" in whys else whys[0]
        return either
    scalar = _SCALAR_CHECKS.get(hint)
    if scalar is not None:
        return scalar
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        nested = hint
        return lambda value: "" if isinstance(value, dict | nested) else f"expected an object, got {value!r:.40}"
    if origin in (list, tuple):
        item = _compiled(args[0] if args else Any)

        def each(value: Any) -> str:
            if not isinstance(value, list | tuple):
                return f"expected a list, got {value!r:.40}"
            return next((f"[{i}]: {why}" for i, x in enumerate(value) if (why := item(x))), "")
        return each
    if origin is dict:
        entry = _compiled(args[1] if len(args) == 2 else Any)

        def every(value: Any) -> str:
            if not isinstance(value, dict):
                return f"expected an object, got {value!r:.40}"
            return next((f"[{k!r}]: {why}" for k, x in value.items() if (why := entry(x))), "")
        return every
    return lambda value: ""


def check(value: Any, hint: Any, what: str) -> None:
    """Raise ValueError naming *what* when *value* is not of type *hint*."""
    why = _compiled(hint)(value)
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
