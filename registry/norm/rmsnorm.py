import math
from dataclasses import dataclass

import torch
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, Norm, register


@dataclass
class NormParams:
    eps: float = SI("${model.norm_eps}")

    def validate(self, model, key):
        if self.eps <= 0:
            raise ConfigError(f"{key}.eps", self.eps, "must be positive", "a number > 0")


@dataclass
class RMSNormParams(NormParams):
    # The scale is (offset + weight): Gemma stores w and scales by (1 + w), so offset 1.0 reads
    # its weights as they are. The weights start at 1 - offset (a unit scale either way).
    offset: float = 0.0

    def validate(self, model, key):
        super().validate(model, key)
        if not math.isfinite(self.offset):
            raise ConfigError(f"{key}.offset", self.offset, "must be a finite number",
                              "0.0 (scale by the weights), 1.0 (Gemma: scale by 1 + weights)")


@register("norm", "rmsnorm", params=RMSNormParams)
class RMSNorm(Norm):
    """RMSNorm: x / sqrt(mean(x^2) + eps) * weight, computed in fp32 (no centring, no bias).
    With an offset, x / sqrt(mean(x^2) + eps) * (offset + weight), the product too in fp32 and
    rounded once to the input's dtype (as Gemma's RMSNorm computes)."""

    table_name = "RMSNorm"

    def __init__(self, params: RMSNormParams, ctx, dim: int | None = None):
        super().__init__()
        self.eps = params.eps
        self.offset = float(params.offset)
        self.weight = nn.Parameter(torch.full((dim or ctx.model.d_model,), 1.0 - self.offset))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)
