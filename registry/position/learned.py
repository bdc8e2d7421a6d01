from dataclasses import dataclass

import torch
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, PositionEncoding, register


@dataclass
class LearnedParams:
    max_positions: int = SI("${model.max_seq_len}")
    offset: int = SI("${model.position_offset}")  # rows reserved before position 0 (BART keeps 2)

    def validate(self, model, key):
        if self.max_positions < 1:
            raise ConfigError(f"{key}.max_positions", self.max_positions, "must be at least 1", "an integer >= 1")
        if self.offset < 0:
            raise ConfigError(f"{key}.offset", self.offset, "must not be negative", "an integer >= 0")


@register("position", "learned", params=LearnedParams)
class LearnedPosition(PositionEncoding):
    """A learned absolute position table added to the token embeddings (GPT-2, BERT)."""

    table_name = "Absolute (learned)"

    def __init__(self, params: LearnedParams, ctx, causal: bool = True):
        super().__init__()
        self.offset = params.offset
        self.max_positions = params.max_positions  # a longer sequence has no row to look up
        self.table = nn.Embedding(params.max_positions + params.offset, ctx.model.embedding_width)
        nn.init.normal_(self.table.weight, std=ctx.model.init_std)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return x + self.table(positions + self.offset).to(x.dtype)
