"""Evaluation figures beside the loss: exact-match accuracy on the asked targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..plugin.objectives import IGNORE


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
