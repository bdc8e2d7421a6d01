"""The values a run used, as one flat mapping of dotted keys.

A sweep's overrides say what the command line changed, not what each job ran with:
`attention=mha` sets 4 key-value heads on a 4-head model although `model.n_kv_heads`
still says 2. A run therefore records its values in effect, from the resolved spec
(the scale applied, defaults filled in, each group's params as its plugin received
them), and the sweep report compares those:

- `model`: the preset's name; `model.<key>`: the model numbers something reads (the
  core, or a chosen plugin through its node), so a number no plugin reads is absent;
- `<group>`: each component group's choice (`attention: mqa`); `<group>.<field>`:
  the params its plugin was built with (`attention.num_kv_heads: 1`);
- then the other sections as the task passes them (`seed`, `task.*`, `data.*`, ...),
  a section's `name` (a chosen node's: `data: recall`) under the section's own key.

Values are JSON scalars; a list or mapping (`model.layer_pattern`) is one JSON text.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from omegaconf import DictConfig

from ..plugin import registry as plugins
from .spec import ModelSpec
from .usage import readers

#: Fields every params dataclass has, that name the choice rather than configure it.
_NAMING = ("plugin", "name")


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.dumps(value, sort_keys=True, default=str)


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """`value` (a dataclass or mapping, nested) as `prefix.key` -> scalar; a scalar as `prefix`."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    return {prefix: _scalar(value)}


def values_in_effect(cfg: DictConfig, spec: ModelSpec, **sections: Any) -> dict[str, Any]:
    """The model's values from `spec` (`cfg` says which model keys are read), then each of
    `sections` flattened under its name: `values_in_effect(cfg, spec, seed=0, task=task)`."""
    read = readers(cfg)
    out: dict[str, Any] = {"model": spec.model.name}
    for f in dataclasses.fields(spec.model):
        if f.name != "name" and f.name in read:
            out[f"model.{f.name}"] = _scalar(getattr(spec.model, f.name))
    for group in plugins.GROUPS:
        params = spec.params[group]
        out[group] = params.name
        for f in dataclasses.fields(params):
            if f.name not in _NAMING:
                out.update(flatten(f"{group}.{f.name}", getattr(params, f.name)))
    for name, value in sections.items():
        flat = flatten(name, value)
        if f"{name}.name" in flat:  # a chosen node (data, precision, compile): its name is the choice
            flat = {name: flat.pop(f"{name}.name"), **flat}
        out.update(flat)
    return out


__all__ = ["flatten", "values_in_effect"]
