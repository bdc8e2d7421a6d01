"""The Hugging Face model types we map, one module per family, each a table.

Adding a model type: write a module here with `TYPES`, its `ModelType`s: config both
ways, the tensor table, the transformers config class's DEFAULTS and the declaration
of what the type can express (`..fit.Expresses`); every module but `common` is a
family. `to_hf` without a model type takes the first type, in this registry's order
(families alphabetically, each family's types in its own order), that fits.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

from ...errors import ConfigError
from ...plugin.registry import add, entries
from .. import fit
from ..mapping import ModelType

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"))


def _load() -> dict[str, ModelType]:
    types: dict[str, ModelType] = {}
    for family in FAMILIES:
        module = importlib.import_module(f"{__name__}.{family}")
        types.update((t.name, t) for t in module.TYPES)
    for name, kind in types.items():  # the one registry of named choices, in this order
        add("hf_model_type", name, kind)
    return types


MODEL_TYPES = _load()


def choose_type(spec: Any) -> ModelType:
    """The first model type that expresses `spec`; none doing so, a ConfigError naming the
    closest type and the field that stops it."""
    return fit.guess(spec, [info.target for info in entries("hf_model_type").values()])


def guess_type(spec: Any) -> Optional[str]:
    """The name of the model type `to_hf` writes `spec` as, or None when none fits."""
    try:
        return choose_type(spec).name
    except ConfigError:
        return None
