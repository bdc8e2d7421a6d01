"""llmarch_compose: a declarative, config-driven compiler for transformer architectures.

    cfg = llmarch_compose.compose(["model=llama3_8b", "attention=mqa"])
    model = llmarch_compose.build(cfg, device="meta")
"""

from .train import data as _data  # noqa: F401  (stores the data nodes)
from .model import precision as _precision  # noqa: F401  (stores the precision nodes)
from .config import scale as _scale  # noqa: F401  (stores the scale nodes)
from .config import schema as _schema  # noqa: F401  (stores the typed config nodes)
from .model.build import build
from .model.compiler import compile
from .plugin.interfaces import (
    Activation,
    Attention,
    FeedForward,
    FeedForwardOutput,
    ModelOutput,
    PositionEncoding,
    PositionInputs,
    PreciseBuffers,
    Topology,
)
from .config.compose import compose
from .artifacts.export import export_package, export_program, load_compiled
from . import tasks as _tasks  # noqa: F401  (stores the task nodes)
from .errors import ConfigError, LlmarchError, PluginConflictError, UnknownChoiceError, UnknownKeyError
from .plugin.registry import register
from .config.spec import BuildContext, ModelSpec, resolve_spec

__version__ = "0.1.0"

__all__ = [
    "compose", "build", "compile", "register", "resolve_spec",
    "BuildContext", "ModelSpec",
    "PositionEncoding", "PositionInputs", "PreciseBuffers", "Activation", "Attention", "FeedForward", "FeedForwardOutput",
    "ModelOutput", "Topology",
    "export_program", "export_package", "load_compiled",
    "ConfigError", "LlmarchError", "PluginConflictError", "UnknownChoiceError", "UnknownKeyError",
]
