from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmarch_compose import ConfigError, Norm, register

from .rmsnorm import NormParams


@dataclass
class LayerNormParams(NormParams):
    bias: bool = True
    # false: no weight and no bias, (x - mean) / sqrt(var + eps) alone (OLMo-1's non-parametric LayerNorm)
    affine: bool = True

    def validate(self, model, key):
        super().validate(model, key)
        if not self.affine and self.bias:
            raise ConfigError(f"{key}.bias", True, "a LayerNorm without affine parameters has no bias",
                              f"false (with {key}.affine=false), or {key}.affine=true")


@register("norm", "layernorm", params=LayerNormParams)
class LayerNorm(Norm):
    """LayerNorm: (x - mean) / sqrt(var + eps) * weight (+ bias); without affine parameters,
    (x - mean) / sqrt(var + eps) alone."""

    table_name = "LayerNorm"

    def __init__(self, params: LayerNormParams, ctx, dim: int | None = None):
        super().__init__()
        dim = dim or ctx.model.d_model
        self.eps = params.eps
        self.shape = (dim,)
        self.weight = nn.Parameter(torch.ones(dim)) if params.affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if params.bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)
