"""Dynamic Tanh (Zhu, Chen, He, LeCun and Liu, "Transformers without Normalization", 2025)."""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmarch_compose import ConfigError, Norm, register


@dataclass
class DyTParams:
    alpha_init: float = 0.5  # the paper's default for alpha's initial value

    def validate(self, model, key):
        if not self.alpha_init > 0:
            raise ConfigError(f"{key}.alpha_init", self.alpha_init, "tanh needs a positive input scale",
                              "a number > 0")


@register("norm", "dyt", params=DyTParams)
class DynamicTanh(Norm):
    """Dynamic Tanh: weight * tanh(alpha * x) + bias, with one learned scalar alpha
    and no statistics over the features (a drop-in replacement for a norm layer)."""

    table_name = "DyT"  # its cell in task=table

    def __init__(self, params: DyTParams, ctx, dim: Optional[int] = None):
        super().__init__()
        dim = dim or ctx.model.d_model
        self.alpha = nn.Parameter(torch.full((1,), float(params.alpha_init)))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias
