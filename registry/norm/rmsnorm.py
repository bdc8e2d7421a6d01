from dataclasses import dataclass

import torch
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, Norm, register


@dataclass
class RMSNormParams:
    eps: float = SI("${model.norm_eps}")

    def validate(self, model, key):
        if self.eps <= 0:
            raise ConfigError(f"{key}.eps", self.eps, "must be positive", "a number > 0")


@register("norm", "rmsnorm", params=RMSNormParams)
class RMSNorm(Norm):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (no centring, no bias)."""

    table_name = "RMSNorm"

    def __init__(self, params: RMSNormParams, ctx, dim: int | None = None):
        super().__init__()
        self.eps = params.eps
        self.weight = nn.Parameter(torch.ones(dim or ctx.model.d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)
