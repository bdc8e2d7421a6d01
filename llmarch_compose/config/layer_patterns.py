"""Per-layer patterns: hybrids as data.

`model.layer_pattern` is a list of rules applied in order; each selects layers
and changes what those layers build:

    layer_pattern:
      - {every: 2, offset: 1, attention: {window: 256}}   # GPT-3: banded every other layer
      - {stop: 3, ffn: dense}                             # DeepSeek: dense before layer 3
      - {every: 2, offset: 0, ffn: dense}                 # Switch: MoE every other layer
      - {every: 6, offset: 5, position: {theta: 1.0e6}}   # Gemma-3: a RoPE base of its own on global layers

Selectors: `every` + `offset` (layers i with i % every == offset), `start` and
`stop` (start <= i < stop), `layers` (an explicit list), `stack` (`encoder` or
`decoder`, for encoder-decoder models); several combine with "and". A group
value is a plugin name (that plugin with its defaults, reading the `model.`
numbers) or a mapping of parameters to change (it may name a `plugin`).

`position` changes the params of the position plugin for the layers selected (RoPE's
`theta` and `scaling`): those layers rotate q and k with a module of their own, built
from the changed params. The plugin stays the model-wide one, and it must act only by
rotating q and k (what is added to the embeddings or to the scores is model-wide).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from ..plugin import registry as plugins
from ..errors import ConfigError, UnknownKeyError, valid_range

#: Groups whose choice may differ from layer to layer.
LAYER_GROUPS = ("attention", "ffn", "norm", "position")
SELECTORS = ("every", "offset", "start", "stop", "layers", "stack")
STACKS = ("encoder", "decoder")


@dataclass(frozen=True)
class LayerRule:
    changes: Mapping[str, Any]  # group -> plugin name or parameter mapping
    every: Optional[int] = None
    offset: int = 0
    start: Optional[int] = None
    stop: Optional[int] = None
    layers: Optional[tuple[int, ...]] = None
    stack: Optional[str] = None
    key: str = field(default="model.layer_pattern", compare=False)

    def selects(self, layer: int, stack: str) -> bool:
        return ((self.every is None or layer % self.every == self.offset)
                and (self.start is None or layer >= self.start)
                and (self.stop is None or layer < self.stop)
                and (self.layers is None or layer in self.layers)
                and (self.stack is None or stack == self.stack))


def parse_rules(pattern: list[Any]) -> list[LayerRule]:
    rules = []
    for i, raw in enumerate(pattern or []):
        key = f"model.layer_pattern[{i}]"
        if not isinstance(raw, Mapping):
            raise ConfigError(key, raw, "each rule is a mapping of selectors and group changes",
                              [*SELECTORS, *LAYER_GROUPS])
        unknown = [k for k in raw if k not in SELECTORS and k not in LAYER_GROUPS]
        if unknown:
            raise UnknownKeyError(f"{key}.{unknown[0]}", raw[unknown[0]], [*SELECTORS, *LAYER_GROUPS])
        selectors = {k: raw[k] for k in SELECTORS if k in raw}
        if "every" in selectors and (not isinstance(selectors["every"], int) or selectors["every"] < 1):
            raise ConfigError(f"{key}.every", selectors["every"], "must be a positive integer", "1, 2, 3, ...")
        if "every" in selectors and not 0 <= selectors.get("offset", 0) < selectors["every"]:
            raise ConfigError(f"{key}.offset", selectors.get("offset"), f"must lie in [0, every={selectors['every']})",
                              valid_range(0, selectors["every"] - 1))
        if "stack" in selectors and selectors["stack"] not in STACKS:
            raise ConfigError(f"{key}.stack", selectors["stack"], "unknown stack", STACKS)
        if "layers" in selectors:
            selectors["layers"] = tuple(selectors["layers"])
        changes = {g: raw[g] for g in LAYER_GROUPS if g in raw}
        if not changes:
            raise ConfigError(key, dict(raw), "a rule must change at least one group", LAYER_GROUPS)
        rules.append(LayerRule(changes=changes, key=key, **selectors))
    return rules


def _plugin_defaults(info: plugins.PluginInfo, model: Mapping[str, Any]) -> dict[str, Any]:
    """A plugin's registered defaults with `${model.*}` resolved against this model."""
    root = OmegaConf.create({"model": dict(model)})
    root["node"] = OmegaConf.structured(info.node)
    return OmegaConf.to_container(root.node, resolve=True)


def layer_node(base: Mapping[str, Any], change: Any, group: str, model: Mapping[str, Any],
               key: str) -> dict[str, Any]:
    """The group node of one layer: `base` (the model-wide choice) changed by a rule."""
    if isinstance(change, str):
        return _plugin_defaults(plugins.get(group, change), model)
    if isinstance(change, (Mapping, DictConfig)):
        change = dict(change)
        plugin = change.get("plugin", base.get("plugin"))
        start = dict(base) if plugin == base.get("plugin") else _plugin_defaults(plugins.get(group, plugin), model)
        return {**start, **change}
    raise ConfigError(key, change, "a group change is a plugin name or a mapping of parameters",
                      plugins.names(group))
