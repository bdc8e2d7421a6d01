from dataclasses import dataclass

import torch

from llmarch_compose import ConfigError, PositionEncoding, register


LAYOUTS = ("interleaved", "halves")


@dataclass
class SinusoidalParams:
    base: float = 10000.0
    # interleaved: sin and cos of each frequency side by side (the paper, tensor2tensor);
    # halves: the sines of every frequency, then the cosines (fairseq, Marian)
    layout: str = "interleaved"

    def validate(self, model, key):
        if self.layout not in LAYOUTS:
            raise ConfigError(f"{key}.layout", self.layout, "unknown layout of the sines and cosines", LAYOUTS)
        if model.embedding_width % 2:
            raise ConfigError("model.d_model", model.d_model, "sinusoidal positions need an even width",
                              "an even integer")


@register("position", "sinusoidal", params=SinusoidalParams)
class SinusoidalPosition(PositionEncoding):
    """Fixed sine/cosine positions of "Attention Is All You Need", added to the
    embeddings: PE[p, 2i] = sin(p / base^(2i/d)), PE[p, 2i+1] = cos(same); with
    layout=halves PE[p, i] = sin(p / base^(2i/d)), PE[p, d/2 + i] = cos(same)."""

    table_name = "Absolute (sinusoidal)"

    def __init__(self, params: SinusoidalParams, ctx, causal: bool = True):
        super().__init__()
        d = ctx.model.embedding_width
        # From Python floats, rounded to float32 once (as a float32 tensor would compute them):
        # on meta this makes no real tensor and runs no reference kernel.
        inv_freq = torch.tensor([params.base ** (-i / d) for i in range(0, d, 2)], dtype=torch.float32)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.halves = params.layout == "halves"

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq  # [..., seq, d/2]
        parts = (angles.sin(), angles.cos())
        # [sin | cos], or sin and cos of each frequency side by side
        table = torch.cat(parts, dim=-1) if self.halves else torch.stack(parts, dim=-1).flatten(-2)
        return x + table.to(x.dtype)
