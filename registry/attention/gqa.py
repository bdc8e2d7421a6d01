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
    scale: Optional[float] = None  # None: 1 / sqrt(head_dim)

    def validate(self, model, key):
        if self.num_kv_heads < 1 or model.n_heads % self.num_kv_heads:
            raise ConfigError(f"{key}.num_kv_heads", self.num_kv_heads,
                              f"must divide model.n_heads={model.n_heads}", divisors(model.n_heads))
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{key}.window", self.window, "a window must hold at least one token",
                              "an integer >= 1, or null for none")


@register("attention", "gqa", params=GQAParams)
class GroupedQueryAttention(Attention):
    """Grouped-query attention: n_heads query heads share num_kv_heads key/value heads
    (MHA and MQA are its two ends), with an optional sliding window. K and V are
    never repeated: SDPA broadcasts them over each group (`enable_gqa`)."""

    def __init__(self, params: GQAParams, ctx, layer_idx: int = 0, causal: bool = True):
        super().__init__()
        m = ctx.model
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, params.num_kv_heads, m.head_dim
        self.causal, self.window, self.scale = causal, params.window, params.scale
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        # One fused projection for q, k and v: one matrix product instead of three.
        self.qkv = nn.Linear(m.d_model, self.q_size + 2 * self.kv_size, bias=params.qkv_bias)
        self.out = nn.Linear(self.q_size, m.d_model, bias=params.out_bias)
        self.rotate = ctx.position.rotate  # a bound method: the topology owns the position module
        for linear in (self.qkv, self.out):
            nn.init.normal_(linear.weight, std=m.init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor, pos: PositionInputs) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotate(q, k, pos)
        mask = allowed(t, t, self.causal, self.window, x.device)
        if pos.bias is not None:
            bias = pos.bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None, scale=self.scale,
            enable_gqa=self.n_kv_heads != self.n_heads)
        return self.out(out.transpose(1, 2).reshape(b, t, self.q_size))

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def kv_cache_tokens(self, context: int) -> int:
        return min(context, self.window) if self.window is not None else context

    def score_flops_per_token(self, context: int) -> float:
        # q.k and the weighted sum of v: 2 FLOPs per multiply-add, head_dim each, per key seen.
        return 4 * self.n_heads * self.head_dim * mean_attended(context, self.causal, self.window)
