import torch
import torch.nn.functional as F

from llmarch_compose import Activation, register


@register("activation", "relu")
class ReLU(Activation):
    """ReLU: max(0, x) (T5 v1.0)."""

    table_name = "ReLU"

    def __init__(self, params, ctx):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


@register("activation", "reglu")
class ReGLU(ReLU):
    """ReGLU: relu(x W) * (x V)."""

    table_name = "ReGLU"

    gated = True
