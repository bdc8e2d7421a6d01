from typing import Optional

import torch

from llmarch_compose import ModelOutput, register
from llmarch_compose.model.cache import DecodeState

from .stack import HeadedTopology, Embeddings, LMHead, Stack, TopologyParams, position_inputs


@register("topology", "decoder_only", params=TopologyParams)
class DecoderOnly(HeadedTopology):
    """A causal language model: embeddings, a stack of causal blocks, an LM head."""

    table_name = "Decoder-Only"

    prefix_lm = False  # prefix_decoder: a bidirectional prefix before the causal part

    def __init__(self, params: TopologyParams, ctx):
        super().__init__()
        self.position = ctx.position
        self.embed = Embeddings(params, ctx, self.position)
        self.decoder = Stack(params, ctx, "decoder", causal=True, cross=False, position=self.position)
        self.head = LMHead(params, ctx, self.embed)

    def forward(self, input_ids: torch.Tensor, prefix_len: Optional[torch.Tensor] = None) -> ModelOutput:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        if prefix_len is not None and not self.prefix_lm:
            raise ValueError("prefix_len is for topology=prefix_decoder")
        if prefix_len is not None:
            prefix_len = torch.as_tensor(prefix_len, device=input_ids.device).expand(input_ids.shape[0])
        x = self.embed(input_ids, positions)
        x, aux = self.decoder(x, position_inputs(self.position, positions, prefix_len))
        return ModelOutput(self.head(x), aux)

    def new_decode_state(self, batch: int, capacity: int, pad: Optional[torch.Tensor] = None, *,
                         prefix_len: Optional[torch.Tensor] = None, device=None, dtype=None) -> DecodeState:
        device, dtype = self._like(device, dtype)
        pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        if prefix_len is not None and not self.prefix_lm:
            raise ValueError("prefix_len is for topology=prefix_decoder")
        return DecodeState({"decoder": self.decoder.new_caches(batch, capacity, pad, device, dtype)}, pad,
                           prefix_len)

    def decode_step(self, input_ids: torch.Tensor, state: DecodeState, all_logits: bool = False) -> ModelOutput:
        x, aux = self._run_cached(self.decoder, self.embed, self.position, input_ids, state)
        return ModelOutput(self._logits(x, all_logits), aux)

