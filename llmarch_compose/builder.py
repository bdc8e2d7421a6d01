"""The builder: a validated spec becomes an `nn.Module`, on meta, cpu or cuda."""

from __future__ import annotations

from typing import Union

import torch
from omegaconf import DictConfig

from .components import Topology
from .spec import BuildContext, ModelSpec, resolve_spec


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def build(cfg: Union[DictConfig, ModelSpec], device: Union[str, torch.device, None] = "cpu",
          dtype: torch.dtype | None = None) -> Topology:
    """Build the model `cfg` describes. Validation runs first, so a bad config
    fails before any tensor is allocated. On `meta` no memory is used, which is
    how full-size presets are counted. A config with `model.path` (a Hugging Face
    checkpoint) gets that checkpoint's weights, every tensor or an error."""
    spec = cfg if isinstance(cfg, ModelSpec) else resolve_spec(cfg)
    device = resolve_device(device)
    ctx = BuildContext(spec)
    with torch.device(device):
        model = ctx.build("topology")
    if spec.model.path and device.type != "meta":  # model=hf: the checkpoint's weights
        from .interop.hf import load_weights

        load_weights(model, spec, spec.model.path)
    if dtype is not None:
        model = model.to(dtype)
    return model
