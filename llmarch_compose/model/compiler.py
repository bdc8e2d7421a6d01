"""The compile stage: `torch.compile` with `fullgraph=True`, regionally by default.

Regional compilation compiles the repeated block once and reuses the graph for
every layer (the blocks share their code and differ only in parameters, which
Dynamo treats as inputs), so compile time stays flat as depth grows.

Dynamo keeps its graphs, guards and recompile counts on the code object of the
frame it compiles (a block's `forward`), and every instance of a class shares that
code. So each compiled model gets a private copy of its blocks' forward code: its
graphs are its own and what was compiled before it in the process (other models,
other sizes) does not count against the recompile limit of its blocks. The copies
go when the model goes, and with them its compiled graphs.
"""

from __future__ import annotations

from dataclasses import dataclass
import types
from typing import Callable, Iterable, Optional

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


def _copy_function(fn: types.FunctionType) -> types.FunctionType:
    """`fn` with a code object of its own (equal, not identical: Dynamo caches by identity)."""
    copy = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__dict__.update(fn.__dict__)
    return copy


def own_forward_code(modules: Iterable[nn.Module]) -> None:
    """Bind each module's `forward` to a copy made for this call: modules that shared a
    forward function share one copy (one graph still serves every layer of a class)."""
    copies: dict[int, types.FunctionType] = {}
    for module in modules:
        bound = module.forward
        fn = getattr(bound, "__func__", None)
        if getattr(bound, "__self__", None) is not module or not isinstance(fn, types.FunctionType):
            continue  # not a plain method (a hook or wrapper set on the instance): left as it is
        fn = getattr(fn, "_original_forward", fn)
        if id(fn) not in copies:
            copies[id(fn)] = _copy_function(fn)
            copies[id(fn)]._original_forward = fn
        module.forward = types.MethodType(copies[id(fn)], module)


def _compile_options(mode: str, fullgraph: bool, dynamic: Optional[bool]) -> Optional[dict]:
    """`torch.compile`'s keyword arguments for `mode`, or None under eager."""
    if mode not in COMPILE_MODES:
        raise ConfigError("compile.mode", mode, "unknown compile mode", COMPILE_MODES)
    if mode == "eager":
        return None
    return dict(fullgraph=fullgraph, dynamic=dynamic, mode=None if mode == "default" else mode)


def compile(model: nn.Module, mode: str = "default", fullgraph: bool = True, regional: bool = True,
            dynamic: Optional[bool] = False) -> nn.Module:
    """Compile `model` for its device. `mode` is eager (no-op), default or max-autotune."""
    options = _compile_options(mode, fullgraph, dynamic)
    if options is None:
        return model
    regions = model.compile_regions() if isinstance(model, Topology) else []
    if regional and regions:
        own_forward_code(regions)
        for block in regions:
            block.compile(**options)
        return model
    own_forward_code([model])
    return torch.compile(model, **options)


def compile_from_config(model: nn.Module, cfg: CompileConfig) -> nn.Module:
    return compile(model, mode=cfg.mode, fullgraph=cfg.fullgraph, regional=cfg.regional, dynamic=cfg.dynamic)


def compile_loss(loss: Callable, cfg: CompileConfig) -> Callable:
    """`loss(logits, targets)` compiled as the model is: Inductor fuses the log-softmax, the
    pick of each target and their gradient, so the batch's log-probabilities are never
    written out (on the reference CPU shape, half the loss's time). `loss` itself under
    compile=eager."""
    options = _compile_options(cfg.mode, cfg.fullgraph, cfg.dynamic)
    return loss if options is None else torch.compile(_copy_function(loss), **options)
