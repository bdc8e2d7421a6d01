"""Activation checkpointing per block (`task.activation_checkpointing`): a block's
activations are recomputed in the backward pass instead of kept from the forward.

- `none`: everything the backward needs is kept (the fastest);
- `full`: each block keeps only its input; its whole forward runs again in the backward;
- `selective`: each block keeps the outputs of its matrix products and attention
  kernels (the costly part to recompute) and recomputes the rest (norms, activations,
  RoPE, residual adds), through PyTorch's selective-checkpoint policy.

The block's `forward` is wrapped in place, after compilation set its code up, so the
parameter names and the state dict stay as they are, and a compiled block traces the
checkpoint into its graph.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from ..errors import ConfigError

MODES = ("none", "full", "selective")

_aten = torch.ops.aten
#: What `selective` keeps: the products and attention kernels, whose recomputation costs most.
KEPT = {op for op in (
    _aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default, _aten.linear.default,
    getattr(_aten, "_grouped_mm", None) and _aten._grouped_mm.default,
    _aten._scaled_dot_product_flash_attention.default, _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
    getattr(_aten, "_scaled_dot_product_cudnn_attention", None) and _aten._scaled_dot_product_cudnn_attention.default,
) if op}


def _keep_products(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in KEPT else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_products)


def _checkpointed(forward: Callable, mode: str) -> Callable:
    extra: dict[str, Any] = {"context_fn": _selective_contexts} if mode == "selective" else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and decoding: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply(model: nn.Module, mode: str) -> None:
    """Wrap every repeated block of `model` (its compile regions) for `mode`."""
    if mode not in MODES:
        raise ConfigError("task.activation_checkpointing", mode, "unknown mode", MODES)
    if mode == "none":
        return
    blocks = model.compile_regions() if hasattr(model, "compile_regions") else []
    if not blocks:
        raise ConfigError("task.activation_checkpointing", mode, f"{type(model).__name__} has no repeated blocks "
                          "to checkpoint", ["none"])
    for block in blocks:
        block.forward = _checkpointed(block.forward, mode)


__all__ = ["MODES", "apply"]
