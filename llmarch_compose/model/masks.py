"""Attention masks and score functions, each written once in FlexAttention's form.

A mask function `mask_mod(b, h, q_idx, kv_idx) -> bool` says whether a query may
see a key; a score function `score_mod(score, b, h, q_idx, kv_idx) -> score`
changes a scaled logit. FlexAttention calls them per element (vmapped or fused
into its kernel); `dense_mask` and `dense_bias` call the very same functions on
broadcast index grids, which gives SDPA's boolean mask or additive bias. So every
mask has one definition whichever kernel runs it.

Indices are token positions 0 .. len-1. Queries are the last `q_len` of the
`k_len` positions (`offset = k_len - q_len`), so a query at index i sits at
position i + offset.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, NamedTuple, Optional

import torch
from torch.nn.attention.flex_attention import BlockMask, and_masks, create_block_mask, or_masks

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- mask functions


def causal(offset: int = 0) -> MaskMod:
    """Keys at or before the query's position."""

    def causal_mask(b, h, q_idx, kv_idx):
        return q_idx + offset >= kv_idx

    return causal_mask


def sliding_window(window: int, offset: int = 0) -> MaskMod:
    """Keys fewer than `window` positions away on either side (with `causal`: the
    `window` most recent keys, the query's own included)."""

    def window_mask(b, h, q_idx, kv_idx):
        return (q_idx + offset - kv_idx).abs() < window

    return window_mask


def prefix(prefix_len: torch.Tensor) -> MaskMod:
    """Keys inside batch row b's bidirectional prefix of `prefix_len[b]` tokens (prefix-LM)."""

    def prefix_mask(b, h, q_idx, kv_idx):
        return kv_idx < prefix_len[b]

    return prefix_mask


def full() -> MaskMod:
    """Every key (bidirectional, no window)."""

    def full_mask(b, h, q_idx, kv_idx):
        return kv_idx >= 0

    return full_mask


# --------------------------------------------------------------- score functions


def bias_table(table: torch.Tensor) -> ScoreMod:
    """Add a score bias looked up in `table`: [heads, q, kv] or [batch, heads, q, kv] (T5's buckets)."""

    if table.dim() == 3:
        def table_bias(score, b, h, q_idx, kv_idx):
            return score + table[h, q_idx, kv_idx].to(score.dtype)
    else:
        def table_bias(score, b, h, q_idx, kv_idx):
            return score + table[b, h, q_idx, kv_idx].to(score.dtype)
    return table_bias


def alibi(slopes: torch.Tensor, offset: int = 0) -> ScoreMod:
    """ALiBi computed on the fly: subtract slopes[h] times the query-key distance."""

    def alibi_bias(score, b, h, q_idx, kv_idx):
        distance = (q_idx + offset - kv_idx).abs()
        return score - (slopes[h] * distance).to(score.dtype)

    return alibi_bias


def softcap(cap: float) -> ScoreMod:
    """Gemma-2's logit cap: cap * tanh(score / cap) keeps every logit inside (-cap, cap)."""

    def capped(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return capped


def chain(*mods: ScoreMod) -> Optional[ScoreMod]:
    """The score functions applied in order (None when there are none)."""
    if not mods:
        return None
    if len(mods) == 1:
        return mods[0]

    def chained(score, b, h, q_idx, kv_idx):
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        return score

    return chained


# ---------------------------------------------------------- what a layer asks for


class MaskSpec(NamedTuple):
    """What an attention layer masks and how it changes scores beyond the position
    encoding's bias: small and hashable, so a stack builds one block mask per distinct
    spec per forward and the layers look theirs up by it."""

    causal: bool
    window: Optional[int] = None
    softcap: Optional[float] = None
    sinks: bool = False  # a learned logit per head joins the softmax (gpt-oss); the mask is the same


def spec_mask(spec: MaskSpec, q_len: int, k_len: int, prefix_len: Optional[torch.Tensor] = None) -> Optional[MaskMod]:
    """The mask function of `spec` (and a prefix), or None when every query sees every key."""
    offset = k_len - q_len
    parts = []
    if spec.causal:
        parts.append(causal(offset))
    if spec.window is not None:
        parts.append(sliding_window(spec.window, offset))
    if not parts:
        return None  # a prefix widens a mask; with none there is nothing to widen
    mask = parts[0] if len(parts) == 1 else and_masks(*parts)
    return mask if prefix_len is None else or_masks(mask, prefix(prefix_len))


def position_scores(slopes: Optional[torch.Tensor], bias: Optional[torch.Tensor], offset: int = 0) -> list[ScoreMod]:
    """The additive score functions a position encoding hands the layers (ALiBi slopes, a bias table)."""
    mods = []
    if slopes is not None:
        mods.append(alibi(slopes, offset))
    if bias is not None:
        mods.append(bias_table(bias))
    return mods


def is_plain(spec: MaskSpec, prefix_len, slopes, bias) -> bool:
    """Whether SDPA's own causal or full attention computes this (no mask or score tensor needed)."""
    widened = prefix_len is not None and spec.causal  # a prefix changes only a causal mask (no window here)
    return (spec.window is None and spec.softcap is None and not spec.sinks and not widened and slopes is None
            and bias is None)


def flex_computes(spec: MaskSpec, device) -> bool:
    """Whether FlexAttention can compute `spec` on `device`. Sinks rescale its output by its
    log-sum-exp, which torch 2.13's CPU flex kernel (Inductor) does not return: on CPU such a
    layer takes the dense path, so no block mask is built for it there."""
    return not (spec.sinks and torch.device(device).type == "cpu")


# ------------------------------------------------------------ dense equivalents


def index_grid(batch: int, heads: int, q_len: int, k_len: int, device) -> tuple[torch.Tensor, ...]:
    """b, h, q_idx, kv_idx shaped to broadcast to [batch, heads, q_len, k_len]."""
    def idx(n, dim):
        shape = [1, 1, 1, 1]
        shape[dim] = n
        return torch.arange(n, device=device).view(shape)

    return idx(batch, 0), idx(heads, 1), idx(q_len, 2), idx(k_len, 3)


def dense_mask(mask: MaskMod, batch: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """The boolean table (True = may attend) of a mask function: broadcastable to
    [batch, heads, q_len, k_len] (a mask never depends on the head here)."""
    return mask(*index_grid(batch, 1, q_len, k_len, device))


def dense_bias(score: ScoreMod, batch: int, heads: int, q_len: int, k_len: int, device,
               dtype: torch.dtype) -> torch.Tensor:
    """The additive bias of an additive score function: the function applied to a zero score."""
    return score(torch.zeros((), device=device, dtype=dtype), *index_grid(batch, heads, q_len, k_len, device))


def mean_attended(context: int, causal: bool, window: Optional[int]) -> float:
    """How many keys a query sees on average over a sequence of `context` tokens."""
    if not causal:
        if window is None:
            return float(context)
        return sum(min(i, window - 1) + min(context - 1 - i, window - 1) + 1 for i in range(context)) / context
    if window is None:
        return (context + 1) / 2
    return sum(min(i + 1, window) for i in range(context)) / context


# ------------------------------------------------------------------ block masks


def flex_runs(device: torch.device, needs_grad: bool, blocks_compiled: bool, traced: bool) -> bool:
    """Whether FlexAttention should run, given where the stack's forward runs.

    - Only compiled: eager flex_attention runs an unfused reference that materializes
      every score (slower than SDPA with a dense mask, and as large).
    - On CPU, only without gradients (there is no FlexAttention backward on CPU), and only
      in regionally compiled blocks: when the whole model is traced, a score bias computed
      in the same graph (T5's table) is something torch 2.13's CPU flex template cannot
      read (it takes captured tensors only as graph inputs), so SDPA runs there.
    - Never under torch.export: a block mask built from a dynamic length cannot be traced,
      so an exported program takes the SDPA path on every device.
    """
    if torch.compiler.is_exporting():
        return False
    if device.type == "cpu":
        return blocks_compiled and not traced and not needs_grad
    return blocks_compiled or traced


class BlockMasks:
    """Builds the block masks a stack's layers ask for, once per forward, outside the
    compiled blocks. A mask that depends only on the spec and the shape is kept for the
    next forward of the same shape (a few, least recently used first out); one with a
    per-batch prefix is built anew each forward."""

    def __init__(self, keep: int = 8, block_size: int = 128, compile_above: int = 1 << 22):
        self.keep, self.block_size, self.compile_above = keep, block_size, compile_above
        self._kept: OrderedDict[tuple, BlockMask] = OrderedDict()

    def build(self, spec: MaskSpec, batch: int, q_len: int, k_len: int, device,
              prefix_len: Optional[torch.Tensor]) -> BlockMask:
        mask = spec_mask(spec, q_len, k_len, prefix_len) or full()
        # Eagerly the mask function runs on every (query, key) pair (~0.2 s at 4096 x 4096 on
        # two CPU cores); compiled it runs once per block after a one-off compile of seconds.
        compiled = q_len * k_len >= self.compile_above and not torch.compiler.is_compiling()
        return create_block_mask(mask, batch if prefix_len is not None else None, None, q_len, k_len,
                                 device=device, BLOCK_SIZE=self.block_size, _compile=compiled)

    def get(self, spec: MaskSpec, batch: int, q_len: int, k_len: int, device,
            prefix_len: Optional[torch.Tensor]) -> BlockMask:
        if prefix_len is not None or torch.compiler.is_compiling():  # no Python state mutated while traced
            return self.build(spec, batch, q_len, k_len, device, prefix_len)
        key = (spec, q_len, k_len, str(device))
        if key in self._kept:
            self._kept.move_to_end(key)
        else:
            self._kept[key] = self.build(spec, batch, q_len, k_len, device, None)
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)
        return self._kept[key]

    def for_forward(self, specs, batch: int, q_len: int, k_len: int, device,
                    prefix_len: Optional[torch.Tensor], slopes, bias) -> tuple[tuple[MaskSpec, BlockMask], ...]:
        """(spec, block mask) for every spec that plain SDPA cannot compute and FlexAttention can."""
        return tuple((spec, self.get(spec, batch, q_len, k_len, device, prefix_len))
                     for spec in specs if not is_plain(spec, prefix_len, slopes, bias) and flex_computes(spec, device))


def find_block_mask(block_masks, spec: MaskSpec) -> Optional[BlockMask]:
    """The block mask built for `spec` this forward, or None (then SDPA runs)."""
    for key, block_mask in block_masks:
        if key == spec:
            return block_mask
    return None
