"""llmarch_compose: a declarative, config-driven compiler for transformer architectures.

    cfg = llmarch_compose.compose(["model=llama3_8b", "attention=mqa"])
    model = llmarch_compose.build(cfg, device="meta")
"""

from . import data as _data  # noqa: F401  (stores the data nodes)
from . import precision as _precision  # noqa: F401  (stores the precision nodes)
from . import scale as _scale  # noqa: F401  (stores the scale nodes)
from . import schema as _schema  # noqa: F401  (stores the typed config nodes)
from .builder import build
from .compile_stage import compile
from .components import (
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
from .config import compose
from .export import export_package, export_program, load_compiled
from . import tasks as _tasks  # noqa: F401  (stores the task nodes)
from .errors import ConfigError, LlmarchError, PluginConflictError, UnknownChoiceError, UnknownKeyError
from .plugins import register
from .spec import BuildContext, ModelSpec, resolve_spec

__version__ = "0.1.0"

__all__ = [
    "compose", "build", "compile", "register", "resolve_spec",
    "BuildContext", "ModelSpec",
    "PositionEncoding", "PositionInputs", "PreciseBuffers", "Activation", "Attention", "FeedForward", "FeedForwardOutput",
    "ModelOutput", "Topology",
    "export_program", "export_package", "load_compiled",
    "ConfigError", "LlmarchError", "PluginConflictError", "UnknownChoiceError", "UnknownKeyError",
]
