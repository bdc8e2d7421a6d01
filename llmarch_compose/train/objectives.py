"""Training objectives, one per kind of topology, over the same stream of token windows.

A topology names its objective in its `objective` attribute:
- `causal_lm`: predict each next token (decoder-only, prefix LMs);
- `masked_lm`: replace 15% of the tokens by a mask id and predict them (BERT);
- `seq2seq`: the encoder reads a corrupted window, the decoder writes the clean
  one, shifted right behind a start token (a denoising objective, as T5 and BART
  are pre-trained).
The mask id is the last id of the model's vocabulary, which byte-level data
never uses when the vocabulary is larger than 256.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OBJECTIVES = ("causal_lm", "masked_lm", "seq2seq")
MASK_RATE = 0.15
IGNORE = -100


def _mask(tokens: torch.Tensor, mask_id: int, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
    chosen = torch.rand(tokens.shape, generator=generator) < MASK_RATE
    chosen[:, 0] |= ~chosen.any(dim=1)  # at least one prediction per row
    return tokens.masked_fill(chosen.to(tokens.device), mask_id), chosen.to(tokens.device)


def loss(model, objective: str, x: torch.Tensor, y: torch.Tensor, vocab_size: int,
         generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss with auxiliary terms, cross-entropy alone) on a window `x` and its next tokens `y`."""
    if objective == "causal_lm":
        out, targets = model(x), y
    elif objective == "masked_lm":
        corrupted, chosen = _mask(x, vocab_size - 1, generator)
        out, targets = model(corrupted), x.masked_fill(~chosen, IGNORE)
    elif objective == "seq2seq":
        corrupted, _ = _mask(x, vocab_size - 1, generator)
        start = torch.zeros_like(x[:, :1])
        out, targets = model(corrupted, torch.cat((start, x[:, :-1]), dim=1)), x
    else:
        raise ValueError(f"unknown objective {objective!r}; known: {OBJECTIVES}")
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
    return (ce + out.aux_loss if out.aux_loss is not None else ce), ce


def exact_match(logits: torch.Tensor, targets: torch.Tensor) -> tuple[int, int, int, int]:
    """Greedy predictions against the targets that are asked (not IGNORE):
    (answer tokens right, answer tokens, sequences with every answer right, sequences with an answer)."""
    asked = targets != IGNORE
    right = (logits.argmax(dim=-1) == targets) & asked
    has_answer = asked.any(dim=1)
    all_right = (right == asked).all(dim=1) & has_answer
    return int(right.sum()), int(asked.sum()), int(all_right.sum()), int(has_answer.sum())


def causal_scores(model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """A causal LM's cross-entropy on the asked targets and its exact-match counts, from one forward pass."""
    logits = model(x).logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE)
    return ce, exact_match(logits, y)
