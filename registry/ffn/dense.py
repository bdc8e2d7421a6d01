from dataclasses import dataclass

import torch
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, FeedForward, FeedForwardOutput, register


@dataclass
class DenseParams:
    hidden: int = SI("${model.ffn_dim}")
    bias: bool = SI("${model.mlp_bias}")

    def validate(self, model, key):
        if self.hidden < 1:
            raise ConfigError(f"{key}.hidden", self.hidden, "must be positive", "an integer >= 1")


def gated_product(activation, h: torch.Tensor) -> torch.Tensor:
    """activation.combine(gate, up) for a gated activation (h holds [gate | up]); act(h) otherwise."""
    if activation.gated:
        gate, up = h.chunk(2, dim=-1)
        return activation.combine(gate, up)
    return activation(h)


@register("ffn", "dense", params=DenseParams)
class DenseFFN(FeedForward):
    """down(act(up(x))), or down(act.combine(gate(x), up(x))) when the activation is gated
    (act(gate(x)) * up(x) for most); gate and up are one fused projection."""

    def __init__(self, params: DenseParams, ctx, layer_idx: int = 0):
        super().__init__()
        d = ctx.model.d_model
        self.activation = ctx.activation
        width = params.hidden * (2 if self.activation.gated else 1)
        self.up = nn.Linear(d, width, bias=params.bias)
        self.down = nn.Linear(params.hidden, d, bias=params.bias)
        for linear in (self.up, self.down):
            nn.init.normal_(linear.weight, std=ctx.model.init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> FeedForwardOutput:
        return FeedForwardOutput(self.down(gated_product(self.activation, self.up(x))), None)
