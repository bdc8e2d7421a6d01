from dataclasses import dataclass

import torch

from llmarch_compose import Activation, ConfigError, register


@dataclass
class ClampedSwiGLUParams:
    alpha: float = 1.702  # the sigmoid's slope: gate * sigmoid(alpha * gate)
    limit: float = 7.0  # the gate is clamped from above at limit, up to [-limit, limit]

    def validate(self, model, key):
        for name in ("alpha", "limit"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{key}.{name}", getattr(self, name), "must be positive",
                                  "a number > 0 (gpt-oss: alpha 1.702, limit 7.0)")


@register("activation", "swiglu_clamped", params=ClampedSwiGLUParams)
class ClampedSwiGLU(Activation):
    """gpt-oss's gated activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""

    table_name = "SwiGLU (clamped)"

    gated = True

    def __init__(self, params: ClampedSwiGLUParams, ctx):
        super().__init__()
        self.alpha, self.limit = params.alpha, params.limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's half alone: what an ungated use of the activation (a head transform) applies."""
        x = x.clamp(max=self.limit)
        return x * torch.sigmoid(self.alpha * x)

    def combine(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self(gate) * (up.clamp(-self.limit, self.limit) + 1)
