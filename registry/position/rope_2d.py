"""GLM's 2D rotary positions (ChatGLM-6B): the first half of each head is rotated by the
token's position, the second half by its position inside the generated block.

For a prefix-LM with prefix length P the ids are

    position ids        0, 1, ..., P-1, P-1, P-1, ...   (generated tokens keep the [gMASK] position)
    block position ids  0, 0, ..., 0,   1,   2,   ...

and each half is an independent rotary embedding of head_dim / 2 dimensions in the
"rotate half" layout (pairs i and i + head_dim / 4 within the half).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from omegaconf import SI

from llmarch_compose import ConfigError, PositionEncoding, PositionInputs, register

from .rope import RotaryPosition, base_inv_freq


@dataclass
class Rope2DParams:
    theta: float = SI("${model.rope_theta}")

    def validate(self, model, key):
        if model.head_dim % 4:
            lower = model.head_dim - model.head_dim % 4
            raise ConfigError("model.head_dim", model.head_dim,
                              "rope_2d rotates pairs within each half of a head, so head_dim (d_model // n_heads "
                              "unless set) must be divisible by 4", [d for d in (lower, lower + 4) if d > 0])
        if self.theta <= 0:
            raise ConfigError(f"{key}.theta", self.theta, "the RoPE base must be positive", "a number > 0")


@register("position", "rope_2d", params=Rope2DParams)
class Rotary2DPosition(RotaryPosition):
    """GLM's 2D RoPE: half of each head rotated by the position, half by the position within the generated block."""

    @classmethod
    def table_label(cls, params: Rope2DParams, model) -> str:
        return "RoPE (2D)"  # not RotaryPosition's: rope_2d has no fraction, the whole head rotates

    # A RotaryPosition over the whole head: `rotate` and the rotation maths are inherited; only
    # the tables (two id sequences) and the pair layout (rotate half within each half) differ.
    def __init__(self, params: Rope2DParams, ctx, causal: bool = True):
        PositionEncoding.__init__(self)  # not RotaryPosition's: it reads scaling and fraction, which rope_2d lacks
        self.params = params
        self.rotary_dim = ctx.model.head_dim
        self.interleaved = False
        self.attention_factor = 1.0
        # ChatGLM-6B's RotaryEmbedding(head_dim // 2): one frequency per pair of a half.
        inv_freq = base_inv_freq(params.theta, self.rotary_dim // 2)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def _inv_freq_for(self, seq_len: int) -> torch.Tensor:
        return self.inv_freq  # no context-extension scaling

    @staticmethod
    def position_ids(positions: torch.Tensor,
                     prefix_len: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(position ids, block position ids) of the token indices `positions` ([seq] or
        [batch, seq], counting from 0); [batch, seq] each when `prefix_len` [batch] is given.
        Without a prefix length the whole sequence is prefix: block position 0 throughout."""
        if prefix_len is None:
            return positions, torch.zeros_like(positions)
        p = prefix_len.to(positions.dtype)[:, None]  # [batch, 1]
        # Index arithmetic only (no .item(), no data-dependent shapes), so it compiles into one graph.
        return torch.minimum(positions, (p - 1).clamp(min=0)), (positions - p + 1).clamp(min=0)

    def attention_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        position_ids, block_ids = self.position_ids(positions, prefix_len)
        first = position_ids.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # [..., seq, head_dim / 4]
        second = block_ids.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        angles = torch.cat((first, first, second, second), dim=-1)  # each half in the rotate-half layout
        return PositionInputs(rotary=(angles.cos(), angles.sin()), prefix_len=prefix_len)

    def _rotate_pairs(self, x: torch.Tensor) -> torch.Tensor:
        # Two independent rotary embeddings: rotate half within each half, never across them.
        first, second = x.chunk(2, dim=-1)
        return torch.cat((super()._rotate_pairs(first), super()._rotate_pairs(second)), dim=-1)
