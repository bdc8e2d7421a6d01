"""The Hugging Face model types we map, one module per family, each a table.

Adding a model type: write a module here with `TYPES` (its `ModelType`s: config
both ways and the tensor table) and `guess(spec)` (the type name `to_hf` writes
for a spec of that family, or None); every module but `common` is a family.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any, Optional

from ..hf import ModelType

FAMILIES = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "common"))


def _load() -> dict[str, ModelType]:
    types: dict[str, ModelType] = {}
    for family in FAMILIES:
        module = importlib.import_module(f"{__name__}.{family}")
        types.update((t.name, t) for t in module.TYPES)
    return types


MODEL_TYPES = _load()


def guess_type(spec: Any) -> Optional[str]:
    """The model type whose architecture `spec` is, or None."""
    for family in FAMILIES:
        found = importlib.import_module(f"{__name__}.{family}").guess(spec)
        if found:
            return found
    return None
