from dataclasses import dataclass
from typing import Optional

import torch

from llmarch_compose import SEQ2SEQ, ConfigError, ModelOutput, register
from llmarch_compose.model.cache import DecodeState

from .stack import HeadedTopology, Embeddings, LMHead, Stack, TopologyParams, position_inputs


@dataclass
class EncoderDecoderParams(TopologyParams):
    def validate(self, model, key):
        super().validate(model, key)
        if self.parallel_residual:  # the decoder's blocks cross-attend
            raise ConfigError(f"{key}.parallel_residual", True, "the parallel block has no place for "
                              "cross-attention", "false")


@register("topology", "encoder_decoder", params=EncoderDecoderParams)
class EncoderDecoder(HeadedTopology):
    """A sequence-to-sequence model (T5, BART): a bidirectional encoder, a causal
    decoder with cross-attention to the encoder's output, one shared token table.
    Each stack has its own position module (T5 learns a relative bias per stack)."""

    stacks = ("encoder", "decoder")

    table_name = "Encoder-Decoder"

    objective = SEQ2SEQ

    def __init__(self, params: EncoderDecoderParams, ctx):
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

    def new_decode_state(self, batch: int, capacity: int, pad: Optional[torch.Tensor] = None, *,
                         source_ids: Optional[torch.Tensor] = None, source_pad: Optional[torch.Tensor] = None,
                         device=None, dtype=None) -> DecodeState:
        """Encode the (left-padded) source once, then hold the decoder's buffers: `capacity`
        decoder steps of self-attention and the source's keys and values for cross-attention,
        which the first `decode_step` writes from the encoder's output."""
        if source_ids is None:
            raise ValueError("an encoder-decoder decodes from a source: pass source_ids")
        device, dtype = self._like(device, dtype)
        length = source_ids.shape[-1]
        source_pad = source_pad if source_pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        encoding = DecodeState({"encoder": self.encoder.new_caches(batch, length, source_pad, device, dtype)},
                               source_pad)
        memory, _ = self._run_cached(self.encoder, self.encoder_embed, self.encoder_position, source_ids, encoding)
        pad = pad if pad is not None else torch.zeros(batch, dtype=torch.long, device=device)
        caches = self.decoder.new_caches(batch, capacity, pad, device, dtype, source=(length, source_pad))
        return DecodeState({"decoder": caches}, pad, memory=memory)

    def decode_step(self, input_ids: torch.Tensor, state: DecodeState, all_logits: bool = False) -> ModelOutput:
        """Decoder tokens; the step after `state.memory` was consumed reads the cross buffers only."""
        x, aux = self._run_cached(self.decoder, self.embed, self.position, input_ids, state, memory=state.memory)
        return ModelOutput(self._logits(x, all_logits), aux)

