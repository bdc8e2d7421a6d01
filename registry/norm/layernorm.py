from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmarch_compose import Norm, register

from .rmsnorm import NormParams


@dataclass
class LayerNormParams(NormParams):
    bias: bool = True


@register("norm", "layernorm", params=LayerNormParams)
class LayerNorm(Norm):
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight (+ bias)."""

    table_name = "LayerNorm"

    def __init__(self, params: LayerNormParams, ctx, dim: int | None = None):
        super().__init__()
        dim = dim or ctx.model.d_model
        self.eps = params.eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if params.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
