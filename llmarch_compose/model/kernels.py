"""Dense attention with a boolean mask and score functions: the path every layer takes
where neither SDPA's own causal form nor FlexAttention applies (cached decoding, score
biases without a block mask, a softcap).

Attention sinks (gpt-oss) are one learned logit per query head that joins the softmax's
denominator and contributes no value. Each kernel takes them its own way: the scores
written out gain a column; SDPA gains one key slot, a zero key (score 0) with a zero value,
on which the additive mask puts the sink; a kernel that returns the log-sum-exp of the
scores (FlexAttention) rescales its output by the sink's share (`sink_rescale`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .masks import ScoreMod, chain, index_grid, softcap


def explicit_attention(q, k, v, score: Optional[ScoreMod], mask: Optional[torch.Tensor], scale: float,
                       sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention with the scores written out, for a score function SDPA cannot take as an
    additive bias (a softcap). The query heads of one KV head are stacked along the query
    axis, so each product is one batched matmul against that head's K or V as they are:
    never repeated, nor broadcast (a broadcast matmul copies K per query head).
    `sinks` [heads]: each head's sink logit joins the softmax as one more column."""
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
    if sinks is not None:
        scores = torch.cat((scores, sinks.to(scores.dtype).view(1, h, 1, 1).expand(b, h, t, 1)), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
    if sinks is not None:
        probs = probs[..., :-1]  # the sink's share of each row goes to no value
    return unstacked(stacked(probs) @ v)


def sink_slot(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              bias: Optional[torch.Tensor], sinks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K and V with one more slot (a zero key, whose score is 0, and a zero value), and the
    additive mask [batch or 1, heads, q, k + 1]: `bias` with -inf where `mask` is False, and
    each head's sink logit on the new slot. SDPA over these is attention with sinks."""
    h, t = q.shape[1], q.shape[-2]
    k = torch.cat((k, k.new_zeros(*k.shape[:-2], 1, k.shape[-1])), dim=-2)
    v = torch.cat((v, v.new_zeros(*v.shape[:-2], 1, v.shape[-1])), dim=-2)
    additive = bias.to(q.dtype) if bias is not None else q.new_zeros(())
    if mask is not None:
        additive = torch.where(mask, additive, float("-inf"))
    additive = additive.expand(*torch.broadcast_shapes(additive.shape, (1, h, t, k.shape[-2] - 1)))
    column = sinks.to(q.dtype).view(1, h, 1, 1).expand(additive.shape[0], h, t, 1)
    return k, v, torch.cat((additive, column), dim=-1)


def sink_rescale(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention output [batch, heads, q, dim] without sinks, given the log-sum-exp of each row's
    scores [batch, heads, q], as with them: the keys' share of the denominator is
    e^lse / (e^lse + e^sink) = sigmoid(lse - sink) (0 for a row that sees no key)."""
    share = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return out * share.unsqueeze(-1).to(out.dtype)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    bias: Optional[torch.Tensor], cap: Optional[float], scale: Optional[float],
                    sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA with a boolean mask and an additive bias (both broadcast to [batch, heads, q, k]),
    or, under a softcap (which is not additive), the scores written out. K and V keep
    their own head count: they are broadcast over the query heads, never repeated.
    `sinks` [heads]: attention sinks (see the module docstring)."""
    if cap is None and q.shape[-2] == 1 and q.device.type == "cpu":
        # One query per row (a decode step): two small matrix products. SDPA's CPU kernel, built
        # for blocks of queries, takes ~10x longer here with a mask.
        scores = None if bias is None else (lambda score, b, h, q_idx, kv_idx: score + bias.to(score.dtype))
        return explicit_attention(q, k, v, scores, mask, scale if scale is not None else q.shape[-1] ** -0.5, sinks)
    if cap is not None:
        mods: list[ScoreMod] = []
        if bias is not None:
            mods.append(lambda score, b, h, q_idx, kv_idx: score + bias.to(score.dtype))
        mods.append(softcap(cap))
        return explicit_attention(q, k, v, chain(*mods), mask, scale if scale is not None else q.shape[-1] ** -0.5,
                                  sinks)
    if sinks is not None:
        k, v, additive = sink_slot(q, k, v, mask, bias, sinks)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if bias is not None:
        bias = bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
