"""Turning a composed config node into a typed dataclass, with errors that name the key."""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Mapping, Optional, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..errors import ConfigError, UnknownKeyError

T = TypeVar("T")


def field_default(f: dataclasses.Field, missing: Any = None) -> Any:
    """The value a dataclass field takes when it is not given (its default, or a fresh one
    from its factory); `missing` for a field that has neither."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return missing


def to_dataclass(schema: type[T], node: Union[DictConfig, Mapping[str, Any]], key: str) -> T:
    """`node` (a subtree of the composed config, or a plain mapping) as an instance of
    `schema`. Interpolations are resolved against the whole config first, so
    `${model.*}` references work; unknown keys and wrong types raise ConfigError."""
    try:
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)
        direct = _construct_directly(schema, node)
        if direct is not None:
            return direct
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None)
        path = f"{key}.{full_key}" if full_key else key
        fields = [f.name for f in dataclasses.fields(schema)]
        if isinstance(exc, (ConfigAttributeError, ConfigKeyError)):
            raise UnknownKeyError(path, _lookup(node, full_key), fields) from None
        raise ConfigError(path, _lookup(node, full_key), str(exc.msg).strip().splitlines()[0], fields) from None


_NO = object()  # a value the direct path leaves to OmegaConf
_SCALARS = (str, bool, int, float)


@functools.lru_cache(maxsize=None)
def _field_types(schema: type) -> Optional[dict[str, tuple[Any, bool]]]:
    """name -> (type, may be None) of each field, or None where the schema has a field the
    direct path does not handle (an enum, a path, a field outside `__init__`)."""
    hints = typing.get_type_hints(schema)
    out = {}
    for f in dataclasses.fields(schema):
        kind, optional = hints[f.name], False
        if typing.get_origin(kind) is Union:
            args = [a for a in typing.get_args(kind) if a is not type(None)]
            if len(args) != 1 or len(typing.get_args(kind)) != 2:
                return None
            kind, optional = args[0], True
        if typing.get_origin(kind) is list and typing.get_args(kind) in ((), (Any,)):
            kind = list
        if not f.init or kind not in (*_SCALARS, Any, list) and not dataclasses.is_dataclass(kind):
            return None
        out[f.name] = (kind, optional)
    return out


def _plain(value: Any) -> Any:
    """A copy of a tree of JSON-like values that OmegaConf would give back unchanged, else _NO."""
    if type(value) is str:
        return _NO if "${" in value or value == "???" else value  # an interpolation, or OmegaConf's "missing"
    if value is None or type(value) in (bool, int, float):  # not a subclass (an enum, a NumPy scalar)
        return value
    if isinstance(value, list):
        items = [_plain(v) for v in value]
        return _NO if any(v is _NO for v in items) else items
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            return _NO
        items = {k: _plain(v) for k, v in value.items()}
        return _NO if any(v is _NO for v in items.values()) else items
    return _NO


def _typed(kind: Any, optional: bool, value: Any) -> Any:
    """`value` as OmegaConf would store it in a field of type `kind`, where that is certain, else _NO."""
    if value is None:
        return None if optional or kind is Any else _NO
    if kind is Any or kind is list and isinstance(value, list):
        return _plain(value)
    if dataclasses.is_dataclass(kind):  # a nested schema (RoPE's scaling)
        nested = _construct_directly(kind, value)
        return _NO if nested is None else nested
    if kind is float and type(value) is int and abs(value) < 2 ** 1023:
        return float(value)  # OmegaConf widens an int given for a float (one too large for a float it refuses)
    if kind in _SCALARS and type(value) is kind:
        return _plain(value)
    return _NO


def _construct_directly(schema: type[T], node: Any) -> Optional[T]:
    """`schema(**node)` where every value already has its field's type exactly, which is what
    OmegaConf would build, without its cost (tens of milliseconds per node, several nodes
    per spec); None where anything needs OmegaConf's conversion or its error message (an
    unknown key, a wrong type, a missing value, an interpolation)."""
    types = _field_types(schema)
    if types is None or not isinstance(node, Mapping):
        return None
    given = {}
    for key, value in node.items():
        if key not in types:
            return None
        typed = _typed(*types[key], value)
        if typed is _NO:
            return None
        given[key] = typed
    for f in dataclasses.fields(schema):
        if f.name not in given and field_default(f, _NO) is _NO:
            return None
    return schema(**given)


def _lookup(node: Any, dotted: Optional[str]) -> Any:
    for part in (dotted or "").split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
