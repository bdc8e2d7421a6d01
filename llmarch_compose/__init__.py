"""llmarch_compose: a declarative, config-driven compiler for transformer architectures.

    cfg = llmarch_compose.compose(["model=llama3_8b", "attention=mqa"])
    model = llmarch_compose.build(cfg, device="meta")

This module is the facade: the stages' public functions, the plugin interfaces and
the errors. Importing it registers nothing and imports no task, benchmark or sweep
module; the registry discovers plugins and named choices on first use.
"""

from .config.compose import compose
from .config.spec import ModelSpec, resolve_spec
from .errors import ConfigError, LlmarchError, PluginConflictError, UnknownChoiceError, UnknownKeyError
from .model.build import build
from .model.compiler import compile
from .plugin.context import BuildContext
from .plugin.interfaces import (
    Activation,
    Attention,
    ComponentParams,
    DataSource,
    FeedForward,
    FeedForwardOutput,
    ModelOutput,
    ModelSource,
    Norm,
    Objective,
    PositionEncoding,
    PositionInputs,
    PreciseBuffers,
    Topology,
)
from .plugin.objectives import CAUSAL_LM, MASKED_LM, SEQ2SEQ
from .plugin.registry import register

__version__ = "0.1.0"

#: Public names whose modules load on first use (export pulls in torch.export and AOTInductor).
_LAZY = {
    "export_program": "llmarch_compose.artifacts.export",
    "export_package": "llmarch_compose.artifacts.export",
    "load_compiled": "llmarch_compose.artifacts.export",
    "generate": "llmarch_compose.inference.generate",
    "fill_mask": "llmarch_compose.inference.generate",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmarch_compose' has no attribute {name!r}")


__all__ = [
    "compose", "build", "compile", "register", "resolve_spec",
    "BuildContext", "ModelSpec",
    "PositionEncoding", "PositionInputs", "PreciseBuffers", "Norm", "Activation", "Attention", "FeedForward",
    "FeedForwardOutput", "ModelOutput", "Topology", "Objective", "DataSource", "ModelSource", "ComponentParams",
    "CAUSAL_LM", "MASKED_LM", "SEQ2SEQ",
    "export_program", "export_package", "load_compiled", "generate", "fill_mask",
    "ConfigError", "LlmarchError", "PluginConflictError", "UnknownChoiceError", "UnknownKeyError",
]
