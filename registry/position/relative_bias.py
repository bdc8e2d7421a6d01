"""T5's relative position bias: a learned score bias per head for each bucket of the
key-minus-query distance, exact for short distances and logarithmic up to max_distance."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmarch_compose import ConfigError, PositionEncoding, PositionInputs, register


@dataclass
class RelativeBiasParams:
    num_buckets: int = 32
    max_distance: int = 128  # distances from here on share their direction's last bucket

    def validate(self, model, key):
        # An encoder halves the buckets between the two directions, and each half needs at
        # least one exact bucket (num_buckets // 4 of them) or the logarithmic formula divides by 0.
        if self.num_buckets < 4:
            raise ConfigError(f"{key}.num_buckets", self.num_buckets,
                              "each direction needs an exact and a logarithmic bucket", "an integer >= 4")
        # The logarithmic buckets span num_buckets // 2 (the exact ones) .. max_distance.
        if self.max_distance <= self.num_buckets // 2:
            raise ConfigError(f"{key}.max_distance", self.max_distance,
                              f"must exceed num_buckets // 2 = {self.num_buckets // 2}, where the "
                              "logarithmic buckets start", f"an integer > {self.num_buckets // 2}")


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """The T5 bucket of each key-minus-query distance in `relative` (an integer tensor).

    Bidirectional (encoder): the upper half of the buckets is for keys after the query.
    Unidirectional (decoder): keys after the query all fall in bucket 0 (they are masked).
    In each half, the first num_buckets // 2 distances get a bucket each, the rest share
    logarithmically wider buckets up to max_distance.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    # float32 and T5's order of operations, so a distance on a bucket edge rounds as it did in
    # training. The clamp only avoids log(0) in the branch torch.where discards.
    log_ratio = torch.log(distance.clamp(min=max_exact).float() / max_exact)
    large = max_exact + (log_ratio / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


@register("position", "relative_bias", params=RelativeBiasParams)
class RelativePositionBias(PositionEncoding):
    """T5's relative position bias: a learned per-head score bias for each bucket of key-minus-query distances."""

    table_name = "Relative (T5 buckets)"

    def __init__(self, params: RelativeBiasParams, ctx, causal: bool = True):
        super().__init__()
        self.bidirectional = not causal  # an encoder tells keys before the query from keys after it
        self.max_distance = params.max_distance
        self.table = nn.Embedding(params.num_buckets, ctx.model.n_heads)
        nn.init.normal_(self.table.weight, std=ctx.model.init_std)
        # Every distance beyond max_distance shares its direction's last bucket, so the buckets of
        # -max_distance .. max_distance, computed once here, serve any length: no logarithm at run
        # time, whose rounding could move an edge distance between eager and compiled code.
        relative = torch.arange(-params.max_distance, params.max_distance + 1)
        self.register_buffer("buckets", relative_position_bucket(relative, self.bidirectional, params.num_buckets,
                                                                 params.max_distance), persistent=False)

    def bucket(self, relative: torch.Tensor) -> torch.Tensor:
        """The bucket of each key-minus-query distance (any integers)."""
        return self.buckets[relative.clamp(-self.max_distance, self.max_distance) + self.max_distance]

    def attention_inputs(self, positions: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> PositionInputs:
        relative = positions[..., None, :] - positions[..., :, None]  # [..., q, k]: key minus query
        bias = self.table(self.bucket(relative))  # [..., q, k, heads]
        return PositionInputs(bias=bias.movedim(-1, -3), prefix_len=prefix_len)

    def cached_bias(self, query_steps: torch.Tensor, key_steps: torch.Tensor) -> torch.Tensor:
        relative = key_steps[None, :] - query_steps[:, None]  # [t, s]: key minus query, as above
        return self.table(self.bucket(relative)).movedim(-1, 0)  # [heads, t, s]
