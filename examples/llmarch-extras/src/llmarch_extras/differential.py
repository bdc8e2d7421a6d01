"""Differential attention (Ye et al., "Differential Transformer", 2024, arXiv:2410.05258).

Each differential head computes two softmax maps from two halves of its query and
key, and attends with their difference:

    (softmax(Q1 K1^T / sqrt(d)) - lambda * softmax(Q2 K2^T / sqrt(d))) V
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init

then normalizes each head (the model's norm plugin over the head's 2d channels)
and scales it by (1 - lambda_init). A model with `n_heads` heads of `head_dim`
has n_heads / 2 differential heads, each with two query/key halves of `head_dim`
and a value of 2 * head_dim: the projections keep the sizes of ordinary attention.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import Attention, ConfigError, PositionInputs, register
from llmarch_compose.config.spec import divisors

#: The PositionInputs fields this layer acts on; any other one a position plugin fills is refused.
UNDERSTOOD_INPUTS = ("rotary", "prefix_len", "positions")


@dataclass
class DifferentialParams:
    # Key/value heads counted as gqa counts them: each differential head uses two.
    num_kv_heads: int = SI("${model.n_kv_heads}")
    lambda_init: Optional[float] = None  # None: the paper's depth schedule 0.8 - 0.6 * exp(-0.3 * layer)
    window: Optional[int] = None  # not supported: declared so that setting one fails by name

    def validate(self, model, key):
        if model.n_heads % 2:
            raise ConfigError("model.n_heads", model.n_heads, "differential attention pairs the query heads",
                              "an even number")
        even = [d for d in divisors(model.n_heads) if d % 2 == 0]
        if self.num_kv_heads not in even:
            raise ConfigError(f"{key}.num_kv_heads", self.num_kv_heads,
                              f"must be even (two per differential head) and divide model.n_heads={model.n_heads}",
                              even)
        if self.window is not None:
            raise ConfigError(f"{key}.window", self.window, "differential attention has no sliding window", "null")
        if self.lambda_init is not None and not 0 <= self.lambda_init < 1:
            raise ConfigError(f"{key}.lambda_init", self.lambda_init,
                              "outputs are scaled by 1 - lambda_init, so it must lie in [0, 1)",
                              "0 <= x < 1, or null for the depth schedule")


def lambda_schedule(layer_idx: int) -> float:
    """The paper's lambda_init for the layer at 0-based depth `layer_idx`."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


@register("attention", "differential", params=DifferentialParams)
class DifferentialAttention(Attention):
    """Differential attention (Ye et al. 2024): each head attends with the difference of
    two softmax maps, cancelling attention that both maps give to irrelevant tokens."""

    def __init__(self, params: DifferentialParams, ctx, layer_idx: int = 0, causal: bool = True,
                 cross: bool = False, position=None):
        super().__init__()
        if cross:
            raise ConfigError("attention", params.name, "differential attention has no cross-attention form",
                              "a topology without cross-attention (decoder_only, encoder_only, prefix_decoder)")
        position = position or ctx.position
        refuse_unknown_inputs(position, ctx.spec.params["position"].name)
        m = ctx.model
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads // 2, params.num_kv_heads // 2, m.head_dim
        self.causal = causal
        init = params.lambda_init if params.lambda_init is not None else lambda_schedule(layer_idx)
        # A buffer, not a Python float: a number that differs between layers would make
        # Dynamo compile one graph per layer instead of one for every block.
        self.register_buffer("lambda_init", torch.tensor(float(init)), persistent=False)
        # Columns: [first query halves | second query halves | first key halves | second key halves | values].
        self.q_size = 2 * self.n_heads * self.head_dim
        self.k_size = 2 * self.n_kv_heads * self.head_dim
        self.v_size = self.n_kv_heads * 2 * self.head_dim
        self.qkv = nn.Linear(m.d_model, self.q_size + self.k_size + self.v_size, bias=False)
        self.out = nn.Linear(self.q_size, m.d_model, bias=False)
        for linear in (self.qkv, self.out):
            nn.init.normal_(linear.weight, std=m.init_std)
        # lambda's four vectors, shared by the layer's heads (the paper's initialization).
        self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2 = (
            nn.Parameter(torch.randn(self.head_dim) * 0.1) for _ in range(4))
        self.head_norm = ctx.build("norm", dim=2 * self.head_dim)
        # A bound method, not a submodule: the topology owns the position module.
        self.rotate = position.rotate

    @classmethod
    def key_value_heads(cls, params: DifferentialParams, model) -> int:
        # Counted as gqa counts them, so the card and task=table read MHA/GQA/MQA as for gqa.
        return params.num_kv_heads

    def lambda_full(self) -> torch.Tensor:
        return (torch.exp(torch.dot(self.lambda_q1, self.lambda_k1))
                - torch.exp(torch.dot(self.lambda_q2, self.lambda_k2)) + self.lambda_init)

    def _mask(self, t: int, pos: PositionInputs, device) -> Optional[torch.Tensor]:
        """None for plain causal or full attention; with a prefix (prefix-LM), causal
        attention plus every key inside the row's prefix: [batch, 1, t, t]."""
        if pos.prefix_len is None:
            return None
        i = torch.arange(t, device=device)
        prefix = i[None, None, None, :] < pos.prefix_len.to(device)[:, None, None, None]
        return prefix | (i[None, :] <= i[:, None]) if self.causal else None

    def forward(self, x: torch.Tensor, pos: PositionInputs) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split((self.q_size, self.k_size, self.v_size), dim=-1)
        q = q.unflatten(-1, (2 * self.n_heads, self.head_dim)).transpose(1, 2)
        k = k.unflatten(-1, (2 * self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = v.unflatten(-1, (self.n_kv_heads, 2 * self.head_dim)).transpose(1, 2)
        q, k = self.rotate(q, k, pos)
        mask = self._mask(t, pos, x.device)
        (q1, q2), (k1, k2) = q.chunk(2, dim=1), k.chunk(2, dim=1)
        # (A1 - lambda A2) V as A1 V - lambda A2 V: two SDPA calls, never a score matrix.
        a1, a2 = (F.scaled_dot_product_attention(qh, kh, v, attn_mask=mask, is_causal=self.causal and mask is None,
                                                 enable_gqa=self.n_heads != self.n_kv_heads)
                  for qh, kh in ((q1, k1), (q2, k2)))
        heads = self.head_norm(a1 - self.lambda_full() * a2) * (1 - self.lambda_init)
        return self.out(heads.transpose(1, 2).reshape(b, t, self.q_size))

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        # Only causal self-attention grows a cache while decoding. Per token: both key
        # halves and the double-width value of every KV head.
        if not self.causal:
            return 0
        return (self.k_size + self.v_size) * dtype_bytes

    def score_flops_per_token(self, context: int) -> float:
        # Per differential head and key seen: two q.k of head_dim and two weighted sums of
        # 2 * head_dim (one per SDPA call), 2 FLOPs per multiply-add.
        keys = (context + 1) / 2 if self.causal else context
        return 2 * (2 * self.head_dim + 2 * 2 * self.head_dim) * self.n_heads * keys


def refuse_unknown_inputs(position, choice: str) -> None:
    """Fail at build time when the position plugin hands attention something this layer
    would ignore (an additive score bias such as ALiBi's or T5's buckets)."""
    probe = position.attention_inputs(torch.arange(1))
    extra = [f for f, value in probe._asdict().items()
             if f not in UNDERSTOOD_INPUTS and isinstance(value, torch.Tensor)]
    if extra:
        raise ConfigError("position", choice, f"differential attention cannot apply a position plugin's "
                          f"{' and '.join(extra)}", "a rotary or embedding position (rope, learned, sinusoidal, none)")
