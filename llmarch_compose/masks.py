"""Attention masks as boolean tables (True = may attend), built from index arithmetic."""

from __future__ import annotations

from typing import Optional

import torch


def allowed(q_len: int, k_len: int, causal: bool, window: Optional[int], device,
            prefix_len: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Which key each query may see: [q_len, k_len], [batch, 1, q_len, k_len] with a
    prefix, or None when every query sees every key.

    Queries are the last `q_len` of the `k_len` positions. A `window` of w keeps
    the w most recent keys including the query's own (causal), or those within
    w - 1 positions on either side (bidirectional). A prefix (prefix-LM) is seen
    by every query, whatever the causal mask and window say.
    """
    if not causal and window is None:
        return None
    q = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k = torch.arange(k_len, device=device)[None, :]
    ok = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        ok = ok & (k <= q)
    if window is not None:
        ok = ok & ((q - k).abs() < window)
    if prefix_len is not None:
        ok = ok | (k < prefix_len.to(device)[:, None, None, None])
    return ok


def mean_attended(context: int, causal: bool, window: Optional[int]) -> float:
    """How many keys a query sees on average over a sequence of `context` tokens."""
    if not causal:
        if window is None:
            return float(context)
        return sum(min(i, window - 1) + min(context - 1 - i, window - 1) + 1 for i in range(context)) / context
    if window is None:
        return (context + 1) / 2
    return sum(min(i + 1, window) for i in range(context)) / context
