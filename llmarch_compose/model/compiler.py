"""The compile stage: `torch.compile` with `fullgraph=True`, regionally by default.

Regional compilation compiles the repeated block once and reuses the graph for
every layer (the blocks share their code and differ only in parameters, which
Dynamo treats as inputs), so compile time stays flat as depth grows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from ..plugin.interfaces import Topology
from ..plugin.registry import add


@dataclass
class CompileConfig:
    """How the built model is compiled: `mode` is eager, default or max-autotune."""

    name: str = "default"
    mode: str = "default"
    fullgraph: bool = True
    regional: bool = True  # compile the repeated block once and reuse it
    dynamic: Optional[bool] = False


COMPILE_MODES = ("eager", "default", "max-autotune")


for _choice, _mode in (("eager", "eager"), ("default", "default"), ("max_autotune", "max-autotune")):
    add("compile", _choice, node=CompileConfig(name=_choice, mode=_mode))


def compile(model: nn.Module, mode: str = "default", fullgraph: bool = True, regional: bool = True,
            dynamic: Optional[bool] = False) -> nn.Module:
    """Compile `model` for its device. `mode` is eager (no-op), default or max-autotune."""
    if mode not in COMPILE_MODES:
        raise ConfigError("compile.mode", mode, "unknown compile mode", COMPILE_MODES)
    if mode == "eager":
        return model
    options = dict(fullgraph=fullgraph, dynamic=dynamic, mode=None if mode == "default" else mode)
    regions = model.compile_regions() if isinstance(model, Topology) else []
    if regional and regions:
        for block in regions:
            block.compile(**options)
        return model
    return torch.compile(model, **options)


def compile_from_config(model: nn.Module, cfg: CompileConfig) -> nn.Module:
    return compile(model, mode=cfg.mode, fullgraph=cfg.fullgraph, regional=cfg.regional, dynamic=cfg.dynamic)
