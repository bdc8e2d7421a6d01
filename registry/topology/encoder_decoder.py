from typing import Optional

import torch

from llmarch_compose import SEQ2SEQ, ModelOutput, register

from .stack import HeadedTopology, Embeddings, LMHead, Stack, TopologyParams, position_inputs


@register("topology", "encoder_decoder", params=TopologyParams)
class EncoderDecoder(HeadedTopology):
    """A sequence-to-sequence model (T5, BART): a bidirectional encoder, a causal
    decoder with cross-attention to the encoder's output, one shared token table.
    Each stack has its own position module (T5 learns a relative bias per stack)."""

    stacks = ("encoder", "decoder")

    table_name = "Encoder-Decoder"

    objective = SEQ2SEQ

    def __init__(self, params: TopologyParams, ctx):
        super().__init__()
        self.encoder_position = ctx.build("position", causal=False)
        self.position = ctx.position  # the decoder's
        # One token table; each stack adds its own positions (and BART its own embedding norm).
        self.encoder_embed = Embeddings(params, ctx, self.encoder_position)
        self.embed = Embeddings(params, ctx, self.position, tokens=self.encoder_embed.tokens)
        self.encoder = Stack(params, ctx, "encoder", causal=False, cross=False, position=self.encoder_position)
        self.decoder = Stack(params, ctx, "decoder", causal=True, cross=True, position=self.position)
        self.head = LMHead(params, ctx, self.embed)

    def encode(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        x = self.encoder_embed(input_ids, positions)
        return self.encoder(x, position_inputs(self.encoder_position, positions))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: Optional[torch.Tensor] = None) -> ModelOutput:
        """Logits over the decoder's positions; without decoder inputs the decoder
        reads the source itself (an autoencoding pass)."""
        memory, enc_aux = self.encode(input_ids)
        target = input_ids if decoder_input_ids is None else decoder_input_ids
        positions = torch.arange(target.shape[-1], device=target.device)
        x = self.embed(target, positions)
        x, dec_aux = self.decoder(x, position_inputs(self.position, positions), memory)
        aux = enc_aux if dec_aux is None else dec_aux if enc_aux is None else enc_aux + dec_aux
        return ModelOutput(self.head(x), aux)
