"""Turning a composed config node into a typed dataclass, with errors that name the key."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

T = TypeVar("T")


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
        raise ConfigError(f"{key}.{full_key}" if full_key else key, getattr(exc, "value", None),
                          str(exc.msg).strip(), [f.name for f in dataclasses.fields(schema)]) from None
