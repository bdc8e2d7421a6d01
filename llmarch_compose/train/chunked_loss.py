"""The LM head and cross-entropy in chunks of tokens (`task.loss_chunk_tokens=N`), so the
logits of a whole batch (batch x length x vocabulary floats: 4 GiB in float32 for 8 x 1K
tokens of a 128K vocabulary, and as much again for their gradient) never exist at once.

While a training step runs inside `deferred_head`, the model's `LMHead` returns its
input, the hidden states, and the objective's cross-entropy is `ChunkedCrossEntropy`: the
forward computes each chunk's logits, their summed loss in float32 and frees them; the
backward computes each chunk's logits again and takes the gradient of the hidden
states and of the head's parameters chunk by chunk. The gradients are exact (the same
products, summed per chunk); the price is the head's forward run twice.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..plugin.objectives import IGNORE


class ChunkedCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of head(hidden) against targets, `chunk` tokens at a time."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, chunk: int, head: Callable,
                *params: torch.Tensor) -> torch.Tensor:
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        count = (flat_t != IGNORE).sum()
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, flat_h.shape[0], chunk):
            logits = head(flat_h[start:start + chunk]).float()
            total += F.cross_entropy(logits, flat_t[start:start + chunk], ignore_index=IGNORE, reduction="sum")
        ctx.save_for_backward(hidden, targets, count)
        ctx.chunk, ctx.head, ctx.params = chunk, head, params
        # The backward recomputes the logits as the forward did: under the same autocast.
        device = hidden.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, targets, count = ctx.saved_tensors
        flat_h, flat_t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        grad_h = torch.empty_like(flat_h)
        params = [p for p in ctx.params if p.requires_grad]
        grads: list[Optional[torch.Tensor]] = [None] * len(params)
        scale = grad_out / count
        device, enabled, dtype = ctx.autocast
        for start in range(0, flat_h.shape[0], ctx.chunk):
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                h = flat_h[start:start + ctx.chunk].detach().requires_grad_(True)
                loss = F.cross_entropy(ctx.head(h).float(), flat_t[start:start + ctx.chunk], ignore_index=IGNORE,
                                       reduction="sum") * scale
                found = torch.autograd.grad(loss, [h, *params], allow_unused=True)
            grad_h[start:start + ctx.chunk] = found[0]
            for i, g in enumerate(found[1:]):  # summed over the chunks in float32, whatever autocast computed in
                if g is not None:
                    grads[i] = g.float() if grads[i] is None else grads[i] + g.float()
        by_param = iter(zip(params, grads))
        param_grads = []
        for p in ctx.params:
            if p.requires_grad:
                _, g = next(by_param)
                param_grads.append(None if g is None else g.to(p.dtype))
            else:
                param_grads.append(None)
        return (grad_h.view_as(hidden), None, None, None, *param_grads)


def lm_head(model: nn.Module):
    """The model's LMHead (every built-in topology has one); a ConfigError otherwise."""
    head = getattr(model, "head", None)
    if head is None or not hasattr(head, "project"):
        raise ConfigError("task.loss_chunk_tokens", None, f"{type(model).__name__} has no LM head to chunk",
                          ["0 (the whole batch's logits at once)"])
    return head


@contextlib.contextmanager
def deferred_head(model: nn.Module, chunk: int) -> Iterator[Optional[Callable]]:
    """Within: the model returns hidden states in place of logits, and the cross-entropy
    to pass to `Objective.loss` computes them chunk by chunk. `chunk` 0: nothing changes."""
    if chunk <= 0:
        yield None
        return
    head = lm_head(model)
    params = tuple(p for p in head.parameters_of_projection() if p.requires_grad)

    def cross_entropy(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ChunkedCrossEntropy.apply(hidden, targets, chunk, head.project, *params)

    head.defer = True
    try:
        yield cross_entropy
    finally:
        head.defer = False


__all__ = ["ChunkedCrossEntropy", "deferred_head"]
