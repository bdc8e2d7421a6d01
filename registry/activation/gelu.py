from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmarch_compose import Activation, ConfigError, register

APPROXIMATIONS = ("none", "tanh")


@dataclass
class GELUParams:
    approximate: str = "none"  # "tanh": GPT-2's gelu_new

    def validate(self, model, key):
        if self.approximate not in APPROXIMATIONS:
            raise ConfigError(f"{key}.approximate", self.approximate, "unknown GELU approximation",
                              APPROXIMATIONS)


@register("activation", "gelu", params=GELUParams)
class GELU(Activation):
    """GELU: x * Phi(x), exact or with the tanh approximation."""

    table_name = "GELU"

    def __init__(self, params: GELUParams, ctx):
        super().__init__()
        self.approximate = params.approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate=self.approximate)


@register("activation", "geglu", params=GELUParams)
class GeGLU(GELU):
    """GeGLU: gelu(x W) * (x V) (T5 v1.1)."""

    table_name = "GeGLU"

    gated = True
