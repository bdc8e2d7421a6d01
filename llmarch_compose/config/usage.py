"""Which `model.` numbers the chosen plugins read, as data.

Group nodes read model numbers by interpolation (`num_kv_heads: ${model.n_kv_heads}`),
so the readers of a model key are the composed group nodes (and layer-pattern nodes)
whose raw values interpolate it, the model keys that interpolate it (`qkv_bias:
${.attention_bias}`) when those are read, and the core (`schema.CORE_FIELDS`). A key the
user sets that nothing reads is refused (`check_used`); one only a preset set is listed
as unused on the architecture card (`unused`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from ..plugin import registry as plugins
from .layer_patterns import LAYER_GROUPS
from .schema import CORE_FIELDS, ModelConfig

MODEL_REF = re.compile(r"\$\{model\.(\w+)")
SIBLING_REF = re.compile(r"\$\{\.(\w+)")
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
CORE = "the core"


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def model_refs(raw: Any) -> dict[str, str]:
    """model key -> the node key that interpolates it, in a raw (unresolved) container."""
    out: dict[str, str] = {}
    if isinstance(raw, Mapping):
        for key, value in raw.items():
            for text in _strings(value):
                for name in MODEL_REF.findall(text):
                    out.setdefault(name, str(key))
    return out


def _raw(node: Any) -> Any:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _defaults(group: str, plugin: str) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(plugins.get(group, plugin).node), resolve=False)


def readers(cfg: DictConfig) -> dict[str, list[str]]:
    """model key -> who reads it (`attention=gqa`, `model.layer_pattern[0].ffn`, the core)."""
    out: dict[str, list[str]] = {name: [CORE] for name in CORE_FIELDS}
    for group in plugins.GROUPS:
        node = cfg.get(group)
        for name in model_refs(_raw(node)):
            out.setdefault(name, []).append(f"{group}={node.get('name')}")
    base = {g: _raw(cfg.get(g)) or {} for g in LAYER_GROUPS}
    for i, rule in enumerate(_raw(cfg.model.get("layer_pattern")) or []):
        if not isinstance(rule, Mapping):
            continue
        for group in LAYER_GROUPS:
            change = rule.get(group)
            if change is None:
                continue
            raw: dict[str, Any] = {}
            plugin = change if isinstance(change, str) else (change.get("plugin") if isinstance(change, Mapping)
                                                              else None)
            if plugin and plugin != base[group].get("plugin") and plugin in plugins.names(group):
                raw.update(_defaults(group, plugin))
            if isinstance(change, Mapping):
                raw.update(change)
            for name in model_refs(raw):
                out.setdefault(name, []).append(f"model.layer_pattern[{i}].{group}")
    # A model key that interpolates another passes its readers on (expert_ffn_dim: ${.ffn_dim}).
    model_raw = _raw(cfg.model)
    changed = True
    while changed:
        changed = False
        for key, value in model_raw.items():
            if key not in out:
                continue
            for text in _strings(value):
                for name in {*SIBLING_REF.findall(text), *MODEL_REF.findall(text)}:
                    if name not in out:
                        out[name] = [f"model.{key}"]
                        changed = True
    return out


def unused(cfg: DictConfig) -> list[str]:
    """Model keys given a value other than the schema's default that nothing reads (a
    preset's number for a plugin it does not choose)."""
    read = readers(cfg)
    defaults = ModelConfig()
    model_raw = _raw(cfg.model)
    out = []
    for name in MODEL_FIELDS:
        if name in read or name not in model_raw:
            continue
        value = model_raw[name]
        if isinstance(value, str) and "${" in value:
            continue
        if value != getattr(defaults, name):
            out.append(name)
    return out


def _user_model_keys(overrides: Sequence[str]) -> dict[str, str]:
    """`model.<field>` keys the overrides set, with the value as typed."""
    out = {}
    for text in overrides:
        key, eq, value = text.lstrip("+~").partition("=")
        if eq and key.startswith("model.") and key.count(".") == 1 and key[6:] in MODEL_FIELDS:
            out[key[6:]] = _typed(value)
    return out


def _typed(value: str) -> Any:
    """An override's number as a number (`4096`, not `'4096'`), for the error message."""
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(value, value)


def _alternatives(name: str, loader: Any) -> list[tuple[str, str, str]]:
    """(group, choice, param) of every group choice that reads `model.<name>`."""
    found = []
    for group in plugins.GROUPS:
        for option in loader.get_group_options(group):
            result = loader.repository.load_config(f"{group}/{option}")
            raw = OmegaConf.to_container(result.config, resolve=False) if result is not None else {}
            param = model_refs(raw).get(name)
            if param is not None:
                found.append((group, option, param))
    return found


def check_used(cfg: DictConfig, overrides: Sequence[str], loader: Optional[Any] = None) -> None:
    """Refuse a `model.` key set in `overrides` that no chosen plugin (nor the core) reads,
    naming the choices that would read it."""
    keys = _user_model_keys(overrides)
    if not keys:
        return
    read = readers(cfg)
    for name, value in keys.items():
        if name in read:
            continue
        alternatives = _alternatives(name, loader) if loader is not None else []
        if not alternatives:
            raise ConfigError(f"model.{name}", value, "no chosen plugin reads it", None)
        group = alternatives[0][0]
        choices = [a for a in alternatives if a[0] == group]
        node = cfg.get(group)
        chosen = node.get("name")
        hints = [f"{group}={choice}" for _, choice, _ in choices]
        param = choices[0][2]
        if isinstance(node, DictConfig) and param in node:
            hints.append(f"{group}.{param}={value}")
        raise ConfigError(f"model.{name}", value, f"{group}={chosen} has no {name}; use " + " or ".join(hints))
