from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from llmarch_compose import MASKED_LM, ModelOutput, register
from llmarch_compose.model.cache import DecodeState

from .stack import HeadedTopology, Embeddings, LMHead, Stack, TopologyParams, position_inputs


@dataclass
class EncoderOnlyParams(TopologyParams):
    # BERT's layout: post-norm, a norm on the embeddings, the MLM head with its bias.
    norm_position: str = "post"
    embedding_norm: bool = True
    mlm_transform: bool = True
    head_bias: str = "param"
    pooler: bool = False  # dense + tanh on the first token (BertModel's pooler)


@register("topology", "encoder_only", params=EncoderOnlyParams)
class EncoderOnly(HeadedTopology):
    """A bidirectional encoder with a masked-LM head (BERT, RoBERTa, ALBERT); the
    logits are the MLM predictions at every position."""

    stacks = ("encoder",)

    table_name = "Encoder-Only"

    objective = MASKED_LM

    def __init__(self, params: EncoderOnlyParams, ctx):
        super().__init__()
        self.position = ctx.build("position", causal=False)
        self.embed = Embeddings(params, ctx, self.position)
        self.encoder = Stack(params, ctx, "encoder", causal=False, cross=False, position=self.position)
        self.head = LMHead(params, ctx, self.embed)
        self.pooler = nn.Linear(ctx.model.d_model, ctx.model.d_model) if params.pooler else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.embed(input_ids, positions, token_type_ids)
        x, aux = self.encoder(x, position_inputs(self.position, positions))
        return ModelOutput(self.head(x), aux)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler's sentence vector from the encoder's hidden states."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def new_decode_state(self, batch: int, capacity: int, pad: Optional[torch.Tensor] = None, *,
                         device=None, dtype=None) -> DecodeState:
        """An encoder reads its whole input at once: this state serves one padded forward
        (`decode_step(..., all_logits=True)`), which is how `fill_mask` runs a padded batch."""
        device, dtype = self._like(device, dtype)
        pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        return DecodeState({"encoder": self.encoder.new_caches(batch, capacity, pad, device, dtype)}, pad)

    def decode_step(self, input_ids: torch.Tensor, state: DecodeState, all_logits: bool = True,
                    token_type_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        x, aux = self._run_cached(self.encoder, self.embed, self.position, input_ids, state,
                                  token_type_ids=token_type_ids)
        return ModelOutput(self._logits(x, all_logits), aux)

