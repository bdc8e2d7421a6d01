"""Dense attention with a boolean mask and score functions: the path every layer takes
where neither SDPA's own causal form nor FlexAttention applies (cached decoding, score
biases without a block mask, a softcap)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .masks import ScoreMod, chain, index_grid, softcap


def explicit_attention(q, k, v, score: Optional[ScoreMod], mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """Attention with the scores written out, for a score function SDPA cannot take as an
    additive bias (a softcap). The query heads of one KV head are stacked along the query
    axis, so each product is one batched matmul against that head's K or V as they are:
    never repeated, nor broadcast (a broadcast matmul copies K per query head)."""
    b, h, t, _ = q.shape
    kv_heads, group = k.shape[1], h // k.shape[1]

    def stacked(x: torch.Tensor) -> torch.Tensor:  # [b, h, t, n] -> [b, kv_heads, group * t, n]
        return x.unflatten(1, (kv_heads, group)).flatten(2, 3)

    def unstacked(x: torch.Tensor) -> torch.Tensor:  # the inverse
        return x.unflatten(2, (group, t)).flatten(1, 2)

    scores = unstacked(stacked(q) @ k.transpose(-1, -2) * scale)  # [b, h, t, s]
    if score is not None:
        scores = score(scores, *index_grid(b, h, t, k.shape[-2], q.device))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    return unstacked(stacked(probs) @ v)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], cap: Optional[float], scale: Optional[float]) -> torch.Tensor:
    """SDPA with a boolean mask and an additive bias (both broadcast to [batch, heads, q, k]),
    or, under a softcap (which is not additive), the scores written out. K and V keep
    their own head count: they are broadcast over the query heads, never repeated."""
    if cap is None and q.shape[-2] == 1 and q.device.type == "cpu":
        # One query per row (a decode step): two small matrix products. SDPA's CPU kernel, built
        # for blocks of queries, takes ~10x longer here with a mask.
        scores = None if bias is None else (lambda score, b, h, q_idx, kv_idx: score + bias.to(score.dtype))
        return explicit_attention(q, k, v, scores, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    if cap is not None:
        mods: list[ScoreMod] = []
        if bias is not None:
            mods.append(lambda score, b, h, q_idx, kv_idx: score + bias.to(score.dtype))
        mods.append(softcap(cap))
        return explicit_attention(q, k, v, chain(*mods), mask, scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
