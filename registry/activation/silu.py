import torch
import torch.nn.functional as F

from llmarch_compose import Activation, register


@register("activation", "silu")
class SiLU(Activation):
    """SiLU (Swish): x * sigmoid(x)."""

    table_name = "SiLU"

    def __init__(self, params, ctx):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


@register("activation", "swiglu")
class SwiGLU(SiLU):
    """SwiGLU: silu(x W) * (x V) (LLaMA, Qwen, Mistral)."""

    table_name = "SwiGLU"

    gated = True
