"""The limit a step is measured against on a CPU: the same matrix products alone, timed with
`torch.mm` and `torch.bmm` at the shapes the step runs them, in the same rounds as the step.

A product is (rows, inner, cols) for `torch.mm` or (batch, rows, inner, cols) for
`torch.bmm`. Attention's products are counted whole (every query against every key), as
SDPA's CPU kernel computes them under a causal mask too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..plugin.interfaces import Attention

Product = tuple[int, ...]


def linear_shapes(model: nn.Module) -> list[tuple[int, int]]:
    """(in, out) of every matrix product the model's layers run per token: its linears and the head (last)."""
    shapes = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    head = model.head
    weight = head.tied.weight if head.tied is not None else head.weight
    shapes.append((weight.shape[1], weight.shape[0]))
    return shapes


def attention_shapes(model: nn.Module) -> Optional[list[tuple[int, int]]]:
    """(heads, head_dim) of every self-attention layer, or None when some attention layer is
    not a plain one (a self-attention, `cross` false, whose scores are `n_heads` x queries x
    keys of `head_dim`: GQA and its MHA, MQA and window forms), for which these products
    would not be the layer's (MLA's split heads, cross-attention)."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers or any(getattr(m, "cross", True) or not hasattr(m, "n_heads") or not hasattr(m, "head_dim")
                         for m in layers):
        return None
    return [(m.n_heads, m.head_dim) for m in layers]


def weights_covered(model: nn.Module) -> bool:
    """Whether the linears and the head are every matrix the model multiplies by (no MoE's
    stacked experts, no other weight outside an nn.Linear or an embedding table)."""
    covered = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    head = model.head
    covered.add(id(head.tied.weight if head.tied is not None else head.weight))
    return all(id(p) in covered for p in model.parameters() if p.dim() >= 2)


def prefill_products(model: nn.Module, batch: int, length: int) -> Optional[tuple[list[Product], list[Product]]]:
    """The inference forward of batch x length with the last position's logits: each linear
    at every token, the head at one token per row, each layer's scores and weighted sums."""
    heads = attention_shapes(model)
    if heads is None or not weights_covered(model):
        return None
    tokens = batch * length
    *layers, (head_in, head_out) = linear_shapes(model)
    mm = [(tokens, i, o) for i, o in layers] + [(batch, head_in, head_out)]
    bmm = [p for h, d in heads for p in ((batch * h, length, d, length), (batch * h, length, length, d))]
    return mm, bmm


def training_products(model: nn.Module, batch: int, length: int) -> Optional[tuple[list[Product], list[Product]]]:
    """A training step's forward and backward: each linear and the head at every token
    (y = x W^T; then dx = dy W and dW = dy^T x), each layer's scores and weighted sums
    (S = Q K^T, O = P V; then dV = P^T dO, dP = dO V^T, dQ = dS K, and dK as autograd
    computes it, transposed: Q^T dS). These are the products, shape for shape, that autograd
    runs for an eager step with SDPA's math backend (tests/test_bench_products.py)."""
    heads = attention_shapes(model)
    if heads is None or not weights_covered(model):
        return None
    n = batch * length
    mm = [p for i, o in linear_shapes(model) for p in ((n, i, o), (n, o, i), (o, n, i))]

    def attention(b: int, d: int) -> list[Product]:  # b = batch x heads
        forward = [(b, length, d, length), (b, length, length, d)]  # S, O
        backward = [(b, length, length, d), (b, length, d, length), (b, length, length, d), (b, d, length, length)]
        return forward + backward  # dV, dP, dQ, dK^T
    bmm = [p for h, d in heads for p in attention(batch * h, d)]
    return mm, bmm


def matrix_products(products: tuple[list[Product], list[Product]], device: torch.device,
                    dtype: torch.dtype) -> Callable[[], None]:
    """A call that runs `products` (mm, bmm) alone. Operands of the same shape are shared:
    memory stays small, and if anything the reference runs faster for it (a conservative limit)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    operands: dict[Product, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair(shape: Product) -> tuple[torch.Tensor, torch.Tensor]:
        if shape not in operands:
            *b, m, k, n = shape
            operands[shape] = (torch.randn(*b, m, k, generator=g).to(device, dtype),
                               torch.randn(*b, k, n, generator=g).to(device, dtype))
        return operands[shape]

    mm, bmm = products
    mm_pairs, bmm_pairs = [pair(p) for p in mm], [pair(p) for p in bmm]

    def run() -> None:
        for a, b in mm_pairs:
            torch.mm(a, b)
        for a, b in bmm_pairs:
            torch.bmm(a, b)
    return run
