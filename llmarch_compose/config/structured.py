"""Turning a composed config node into a typed dataclass, with errors that name the key."""

from __future__ import annotations

import dataclasses
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
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as exc:
        full_key = getattr(exc, "full_key", None)
        path = f"{key}.{full_key}" if full_key else key
        fields = [f.name for f in dataclasses.fields(schema)]
        if isinstance(exc, (ConfigAttributeError, ConfigKeyError)):
            raise UnknownKeyError(path, _lookup(node, full_key), fields) from None
        raise ConfigError(path, _lookup(node, full_key), str(exc.msg).strip().splitlines()[0], fields) from None


def _lookup(node: Any, dotted: Optional[str]) -> Any:
    for part in (dotted or "").split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node
