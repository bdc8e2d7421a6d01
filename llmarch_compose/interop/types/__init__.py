"""The Hugging Face model types we map, one module per family, each a table.

Adding a model type: write a module with `ModelType`s (config both ways and the
tensor table) and list it in FAMILIES; `guess_type` picks the type `to_hf`
writes when none is named.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from ..hf import ModelType

FAMILIES = ("llama",)


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
