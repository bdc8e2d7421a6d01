from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import Attention, ConfigError, PositionInputs, register
from llmarch_compose.masks import allowed, mean_attended
from llmarch_compose.spec import divisors


@dataclass
class GQAParams:
    num_kv_heads: int = SI("${model.n_kv_heads}")  # n_heads: MHA; 1: MQA; between: GQA
    qkv_bias: bool = SI("${model.qkv_bias}")
    out_bias: bool = SI("${model.attention_bias}")
    window: Optional[int] = None  # sliding window (keys per query, its own included)
    scale: Optional[float] = SI("${model.attention_scale}")  # None: 1 / sqrt(head_dim)
    qk_norm: bool = SI("${model.qk_norm}")  # the norm plugin on each head's queries and keys

    def validate(self, model, key):
        if self.num_kv_heads < 1 or model.n_heads % self.num_kv_heads:
            raise ConfigError(f"{key}.num_kv_heads", self.num_kv_heads,
                              f"must divide model.n_heads={model.n_heads}", divisors(model.n_heads))
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{key}.window", self.window, "a window must hold at least one token",
                              "an integer >= 1, or null for none")


def scaled_dot_product(q, k, v, pos: PositionInputs, causal: bool, window: Optional[int],
                       scale: Optional[float]) -> torch.Tensor:
    """SDPA over [batch, heads, seq, dim] with the mask and score bias the inputs ask for.

    K and V keep their own head count: SDPA broadcasts them over each query group
    (`enable_gqa`), so they are never repeated in memory.
    """
    mask = allowed(q.shape[-2], k.shape[-2], causal, window, q.device, pos.prefix_len)
    if pos.bias is not None:
        bias = pos.bias.to(q.dtype)
        mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


@register("attention", "gqa", params=GQAParams)
class GroupedQueryAttention(Attention):
    """Grouped-query attention: n_heads query heads share num_kv_heads key/value heads
    (MHA and MQA are its two ends), with an optional sliding window, QK-norm, and a
    cross-attention form for encoder-decoder models."""

    def __init__(self, params: GQAParams, ctx, layer_idx: int = 0, causal: bool = True, cross: bool = False,
                 position=None):
        super().__init__()
        m = ctx.model
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, params.num_kv_heads, m.head_dim
        self.causal, self.window, self.scale, self.cross = causal and not cross, params.window, params.scale, cross
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if cross:  # queries from the decoder, keys and values from the encoder's output
            self.q = nn.Linear(m.d_model, self.q_size, bias=params.qkv_bias)
            self.kv = nn.Linear(m.d_model, 2 * self.kv_size, bias=params.qkv_bias)
        else:  # one fused projection: one matrix product instead of three
            self.qkv = nn.Linear(m.d_model, self.q_size + 2 * self.kv_size, bias=params.qkv_bias)
        self.out = nn.Linear(self.q_size, m.d_model, bias=params.out_bias)
        self.q_norm = ctx.build("norm", dim=self.head_dim) if params.qk_norm else None
        self.k_norm = ctx.build("norm", dim=self.head_dim) if params.qk_norm else None
        # A bound method, not a submodule: the topology owns the position module.
        self.rotate = (position or ctx.position).rotate
        for linear in self.children():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=m.init_std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, pos: PositionInputs, memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, t, _ = x.shape
        if self.cross:
            q = self.q(x)
            k, v = self.kv(memory).split((self.kv_size, self.kv_size), dim=-1)
        else:
            q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q, k, v = self.heads(q, self.n_heads), self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.cross:  # no positions across the two sequences
            pos = PositionInputs()
        else:
            q, k = self.rotate(q, k, pos)
        out = scaled_dot_product(q, k, v, pos, self.causal, self.window, self.scale)
        return self.out(out.transpose(1, 2).reshape(b, t, self.q_size))

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        # Only causal self-attention grows a cache while decoding: an encoder runs
        # once, and cross-attention's keys come from the source, not the output.
        if self.cross or not self.causal:
            return 0
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def kv_cache_tokens(self, context: int) -> int:
        return min(context, self.window) if self.window is not None else context

    def score_flops_per_token(self, context: int) -> float:
        # q.k and the weighted sum of v: 2 FLOPs per multiply-add, head_dim each, per key seen.
        return 4 * self.n_heads * self.head_dim * mean_attended(context, self.causal, self.window)
