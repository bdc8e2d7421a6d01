"""Choosing the next token from logits: greedy, or sampled after temperature, top-k and
top-p (nucleus) filtering, in that order (the order transformers applies them)."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..errors import ConfigError


def check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """Refuse settings that would sample from nothing or from everything by accident."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ConfigError("temperature", temperature, "divides the logits", "a finite number > 0 (1.0: unchanged)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ConfigError("top_k", top_k, "keeps the k likeliest tokens", "an integer >= 1, or null for all")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError("top_p", top_p, "keeps the likeliest tokens whose probabilities reach p",
                          "a number in (0, 1], or null for all")


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> torch.Tensor:
    """[batch, vocab] logits scaled by 1/temperature, with tokens outside the top k and outside
    the nucleus (the smallest set of likeliest tokens whose probability reaches top_p) at
    -inf. The likeliest token always stays."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = torch.sort(logits, dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # A token is dropped when the likelier tokens before it already reach top_p.
        before = probs.cumsum(dim=-1) - probs
        drop = before >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def choose(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: Optional[int],
           top_p: Optional[float], generator: Optional[torch.Generator]) -> torch.Tensor:
    """The next token of each row: [batch]."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
