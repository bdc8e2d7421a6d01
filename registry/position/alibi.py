"""ALiBi (Press et al., "Train Short, Test Long"): no position parameters; each head
penalises a score linearly in the query-key distance, with its own slope (BLOOM, Baichuan2-13B)."""

from __future__ import annotations

from typing import Optional

import torch

from llmarch_compose import PositionEncoding, PositionInputs, register
from llmarch_compose.model.masks import alibi


def alibi_slopes(n_heads: int) -> list[float]:
    """The paper's slopes. For n a power of two: the geometric sequence 2^(-8/n), 2^(-16/n),
    ..., 2^-8. Otherwise the slopes of the largest power of two p below n, then every other
    slope of 2p (the ones between p's), as many as are missing."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    p = 1 << (n_heads.bit_length() - 1)  # exact, where floor(log2(n)) could round
    return geometric(p) + geometric(2 * p)[0::2][: n_heads - p]


@register("position", "alibi")
class ALiBi(PositionEncoding):
    """ALiBi: no position parameters; each head adds -slope * |query - key distance| to its scores."""

    table_name = "ALiBi"

    def __init__(self, params, ctx, causal: bool = True):
        super().__init__()
        # float32 (or wider) even in a bf16 model: PositionEncoding._apply keeps the table's precision.
        self.register_buffer("slopes", torch.tensor(alibi_slopes(ctx.model.n_heads), dtype=torch.float32),
                             persistent=False)

    def attention_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        """The dense bias [(batch,) heads, q, k] at any positions (for readers of the table)."""
        # The distance form -slope * |i - j|, not BLOOM's +slope * j: the two agree under softmax
        # only on causal rows, and |i - j| is also right for a bidirectional stack or prefix.
        # On a causal row it is -slope * (i - j) wherever the mask lets a key through.
        # It is masks.alibi's own definition, evaluated on the positions given.
        q, k = positions[..., :, None], positions[..., None, :]  # [..., q, k]
        h = torch.arange(self.slopes.numel(), device=positions.device)[:, None, None]
        bias = alibi(self.slopes)(torch.zeros((), dtype=self.slopes.dtype, device=positions.device),
                                  0, h, q.unsqueeze(-3), k.unsqueeze(-3))  # [..., heads, q, k]
        return PositionInputs(bias=bias, prefix_len=prefix_len)

    def kernel_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        # The slopes alone: the kernel computes slope * distance per score, never a [heads, q, k]
        # table. Distances are index differences, as the stacks' positions are 0 .. seq-1.
        return PositionInputs(slopes=self.slopes, prefix_len=prefix_len)

    def cached_bias(self, query_steps: torch.Tensor, key_steps: torch.Tensor) -> torch.Tensor:
        # Distances are step differences while decoding: a row's left padding cancels out.
        h = torch.arange(self.slopes.numel(), device=query_steps.device)[:, None, None]
        return alibi(self.slopes)(torch.zeros((), dtype=self.slopes.dtype, device=query_steps.device),
                                  0, h, query_steps[None, :, None], key_steps[None, None, :])  # [heads, t, s]
