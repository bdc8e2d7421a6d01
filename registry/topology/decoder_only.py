from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn

from llmarch_compose import ConfigError, ModelOutput, PositionInputs, Topology, register

NORM_POSITIONS = ("pre", "post")


@dataclass
class DecoderOnlyParams:
    norm_position: str = "pre"  # pre: x + f(norm(x)) (GPT-2, LLaMA); post: norm(x + f(x)) (original)
    parallel_residual: bool = False  # x + attn(norm1(x)) + ffn(norm2(x)) (GPT-J, GPT-NeoX)
    tie_embeddings: bool = SI("${model.tie_embeddings}")

    def validate(self, model, key):
        if self.norm_position not in NORM_POSITIONS:
            raise ConfigError(f"{key}.norm_position", self.norm_position, "unknown norm placement",
                              NORM_POSITIONS)
        if self.parallel_residual and self.norm_position != "pre":
            raise ConfigError(f"{key}.parallel_residual", True, "a parallel residual needs pre-norm",
                              f"false, or {key}.norm_position=pre")


class DecoderBlock(nn.Module):
    """One attention + FFN block with its norms and residuals."""

    def __init__(self, params: DecoderOnlyParams, ctx, layer_idx: int, causal: bool = True):
        super().__init__()
        self.pre_norm = params.norm_position == "pre"
        self.parallel = params.parallel_residual
        self.attn_norm = ctx.build("norm")
        self.attn = ctx.build("attention", layer_idx=layer_idx, causal=causal)
        self.ffn_norm = ctx.build("norm")
        self.ffn = ctx.build("ffn", layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, pos: PositionInputs) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.parallel:
            f = self.ffn(self.ffn_norm(x))
            return x + self.attn(self.attn_norm(x), pos) + f.output, f.aux_loss
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), pos)
            f = self.ffn(self.ffn_norm(x))
            return x + f.output, f.aux_loss
        x = self.attn_norm(x + self.attn(x, pos))
        f = self.ffn(x)
        return self.ffn_norm(x + f.output), f.aux_loss


@register("topology", "decoder_only", params=DecoderOnlyParams)
class DecoderOnly(Topology):
    """A causal language model: token embeddings, a stack of causal blocks, a final
    norm (pre-norm only) and an LM head, tied to the embeddings or not."""

    def __init__(self, params: DecoderOnlyParams, ctx):
        super().__init__()
        m = ctx.model
        self.tied = params.tie_embeddings
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        nn.init.normal_(self.embed.weight, std=m.init_std)
        self.position = ctx.position
        self.blocks = nn.ModuleList(DecoderBlock(params, ctx, i) for i in range(m.n_layers))
        self.final_norm = ctx.build("norm") if params.norm_position == "pre" else nn.Identity()
        self.lm_head = None if self.tied else nn.Linear(m.d_model, m.vocab_size, bias=False)
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, std=m.init_std)

    def forward(self, input_ids: torch.Tensor) -> ModelOutput:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.position.embed(self.embed(input_ids), positions)
        pos = self.position.attention_inputs(positions)
        aux = None
        for block in self.blocks:
            x, block_aux = block(x, pos)
            if block_aux is not None:
                aux = block_aux if aux is None else aux + block_aux
        x = self.final_norm(x)
        head = self.embed.weight if self.tied else self.lm_head.weight
        return ModelOutput(F.linear(x, head), aux)
