"""The builder: a validated spec becomes an `nn.Module`, on meta, cpu or cuda."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Union

import torch
from torch.overrides import TorchFunctionMode
from omegaconf import DictConfig

from ..plugin.interfaces import Topology
from ..errors import ConfigError
from ..config.compose import model_source
from ..config.spec import ModelSpec, resolve_spec
from ..plugin.context import BuildContext


#: What the `device` key takes; `meta` (shapes only, no memory) is for building and counting.
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:<index>", "meta")
_DEVICE = re.compile(r"(auto|cpu|meta|cuda)(?::(\d+))?")


def resolve_device(device: Union[str, torch.device, None], key: str = "device") -> torch.device:
    """The device `device` names: `auto` (or None) is cuda when available, else
    cpu. An unknown name, or cuda where there is none, is a ConfigError on `key`."""
    value = "auto" if device is None else str(device)
    match = _DEVICE.fullmatch(value.strip().lower())
    if match is None or (match[2] is not None and match[1] != "cuda"):
        raise ConfigError(key, value, "unknown device", DEVICE_CHOICES)
    name, index = match[1], match[2]
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(key, value, "CUDA is not available here (torch.cuda.is_available() is False)",
                              [c for c in DEVICE_CHOICES if not c.startswith("cuda")])
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise ConfigError(key, value, f"there {'is' if count == 1 else 'are'} {count} CUDA device(s)",
                              ["auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(count))])
        return torch.device("cuda", int(index)) if index is not None else torch.device("cuda")
    return torch.device(name)


class _ValuesUnread(TorchFunctionMode):
    """Building on meta, where no value is ever read: in-place initializers return at once.
    Their meta kernels are Python references whose first call imports Dynamo, which is
    most of the start-up time of `task=summary`."""

    SKIPPED = frozenset({
        torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_, torch.Tensor.copy_,
        torch.nn.init.normal_, torch.nn.init.uniform_, torch.nn.init.trunc_normal_, torch.nn.init.zeros_,
        torch.nn.init.ones_, torch.nn.init.constant_, torch.nn.init.kaiming_uniform_, torch.nn.init.kaiming_normal_,
        torch.nn.init.xavier_uniform_, torch.nn.init.xavier_normal_,
    })

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.SKIPPED:
            target = args[0] if args else kwargs.get("tensor")  # torch.nn.init passes it by name
            if isinstance(target, torch.Tensor) and target.is_meta:
                return target
        return func(*args, **kwargs)


def build(cfg: Union[DictConfig, ModelSpec], device: Union[str, torch.device, None] = "cpu",
          dtype: torch.dtype | None = None) -> Topology:
    """Build the model `cfg` describes. Validation runs first, so a bad config
    fails before any tensor is allocated. On `meta` no memory is used, which is
    how full-size presets are counted. A config with `model.path` (a Hugging Face
    checkpoint) gets that checkpoint's weights, every tensor or an error."""
    spec = cfg if isinstance(cfg, ModelSpec) else resolve_spec(cfg)
    device = resolve_device(device)
    ctx = BuildContext(spec)
    with torch.device(device), (_ValuesUnread() if device.type == "meta" else contextlib.nullcontext()):
        model = ctx.build("topology")
    if spec.model.path and device.type != "meta":  # model=hf: the checkpoint's weights
        model_source(spec.model.path).load_weights(model, spec, Path(spec.model.path).expanduser())
    if dtype is not None:
        model = model.to(dtype)
    model.spec = spec  # what generation and the writers read back (the numbers, the token ids)
    return model
