"""Training objectives: what a topology is trained for, as objects the topology declares.

A topology's `objective` is one of these; the training loop, the evaluation, the
benchmark, the export and the plugin checks ask it instead of switching on names:
- `CAUSAL_LM`: predict each next token (decoder-only, prefix LMs);
- `MASKED_LM`: replace 15% of the tokens by a mask id and predict them (BERT);
- `SEQ2SEQ`: the encoder reads a corrupted window, the decoder writes the clean
  one, shifted right behind a start token (a denoising objective, as T5 and BART
  are pre-trained).
The mask id is the last id of the model's vocabulary, which byte-level data
never uses when the vocabulary is larger than 256.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

MASK_RATE = 0.15
#: The target id that asks nothing (cross-entropy ignores it).
IGNORE = -100


def _mask(tokens: torch.Tensor, mask_id: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.rand(tokens.shape, generator=generator) < MASK_RATE
    chosen[:, 0] |= ~chosen.any(dim=1)  # at least one prediction per row
    return tokens.masked_fill(chosen.to(tokens.device), mask_id), chosen.to(tokens.device)


def full_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that ask something, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)


class Objective:
    """What a topology is trained for: its loss on a window of tokens, and what its forward takes."""

    #: The name the summary and the card show.
    name: str = ""
    #: Whether the model predicts each next token from the ones before (what synthetic tasks,
    #: causality checks and decoding need).
    causal: bool = False
    #: The token-id inputs of the topology's forward, in order (what an export traces).
    input_names: tuple[str, ...] = ("input_ids",)

    def forward(self, model, x: torch.Tensor, y: torch.Tensor, vocab_size: int,
                generator: Optional[torch.Generator]) -> tuple[object, torch.Tensor]:
        """(the model's output on the window `x` with next tokens `y`, the targets its logits predict)."""
        raise NotImplementedError

    def loss(self, model, x: torch.Tensor, y: torch.Tensor, vocab_size: int,
             generator: Optional[torch.Generator] = None,
             cross_entropy: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss with auxiliary terms, cross-entropy alone). `cross_entropy(output, targets)`
        replaces the cross-entropy of the whole logits (the chunked head's, which gets
        hidden states as `output`)."""
        out, targets = self.forward(model, x, y, vocab_size, generator)
        ce = (cross_entropy or full_cross_entropy)(out.logits, targets)
        return (ce + out.aux_loss if out.aux_loss is not None else ce), ce

    def __repr__(self) -> str:
        return self.name


class CausalLM(Objective):
    name, causal = "causal_lm", True

    def forward(self, model, x, y, vocab_size, generator):
        return model(x), y


class MaskedLM(Objective):
    name = "masked_lm"

    def forward(self, model, x, y, vocab_size, generator):
        corrupted, chosen = _mask(x, vocab_size - 1, generator)
        return model(corrupted), x.masked_fill(~chosen, IGNORE)


class Seq2Seq(Objective):
    name = "seq2seq"
    input_names = ("input_ids", "decoder_input_ids")

    def forward(self, model, x, y, vocab_size, generator):
        corrupted, _ = _mask(x, vocab_size - 1, generator)
        start = torch.zeros_like(x[:, :1])
        return model(corrupted, torch.cat((start, x[:, :-1]), dim=1)), x


CAUSAL_LM, MASKED_LM, SEQ2SEQ = CausalLM(), MaskedLM(), Seq2Seq()
