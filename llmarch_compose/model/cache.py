"""Decoding state: the per-layer key/value buffers and the attention that reads them.

Generation feeds a model a few tokens at a time and keeps, per attention layer, what
later tokens attend to. Every sequence of a batch advances in lock-step, one *step*
per token; a row that is left-padded simply starts later. So a buffer records, per
slot, the step whose keys it holds (shared by the rows), and each row its padding:

- a token's position in its own row is `step - pad[row]` (what RoPE, learned and
  sinusoidal positions see), while relative encodings (ALiBi, T5's buckets) see step
  differences, in which the padding cancels;
- a key is visible when its slot is filled, it is not padding, and the layer's rule
  allows it (causal, a window, a bidirectional prefix); a query always sees itself,
  so padding rows stay finite.

Buffers are preallocated at their final size and written in place (`index_copy_`),
so one compiled decode step serves every token. A sliding-window layer keeps a
rolling buffer of `window` slots (slot = step mod window): its memory is flat in
the length of the sequence. The attention plugins decide what a buffer holds (K and
V of `num_kv_heads` heads for GQA; the latent and the shared rotary key for MLA).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from .kernels import dense_attention

#: `position.cached_bias(query_steps [t], key_steps [s]) -> [heads, t, s]`, or None.
BiasFn = Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


class DecodeInputs(NamedTuple):
    """What every attention layer needs, in decoding mode, beyond its own buffer
    (`PositionInputs.decoding`)."""

    steps: torch.Tensor  # [t] the step of each new token (the same for every row)
    pad: torch.Tensor  # [batch] each row's left padding, in steps
    prefix_len: Optional[torch.Tensor] = None  # [batch] real tokens of the bidirectional prefix (prefix-LM)
    bias: Optional[BiasFn] = None  # the position encoding's score bias between steps


class KVBuffer:
    """One attention layer's decoding state: named tensors [batch, heads, capacity, dim]
    (the layout attention reads, so no step transposes), the step each slot holds
    (-1: empty) and each row's left padding.

    `rolling`: a sliding window's buffer of `capacity` = window slots, written at
    step mod window; otherwise slot = step, and `capacity` bounds the sequence."""

    def __init__(self, batch: int, capacity: int, pad: torch.Tensor, shapes: dict[str, tuple[int, int]],
                 rolling: bool = False, device=None, dtype=None):
        self.capacity, self.rolling, self.pad = capacity, rolling, pad
        self.tensors = {name: torch.zeros(batch, heads, capacity, dim, device=device, dtype=dtype)
                        for name, (heads, dim) in shapes.items()}
        self.steps = torch.full((capacity,), -1, dtype=torch.long, device=device)

    @property
    def nbytes(self) -> int:
        """Bytes of cached keys and values (the slot steps and padding are bookkeeping)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def write(self, steps: torch.Tensor, **new: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Store the new tokens' entries ([batch, heads, t, dim] each, at `steps`) and return
        what the new queries attend over: (entries by name, the step of each key).

        A rolling buffer given several tokens at once (a prompt) returns its old slots and
        the new tokens side by side: a new token's window may reach keys that later tokens
        of the same call overwrite. Only the last `window` of them are kept."""
        t = steps.shape[0]
        if self.rolling and t > 1:
            keys = {n: torch.cat((self.tensors[n], new[n].to(self.tensors[n].dtype)), dim=-2) for n in self.tensors}
            key_steps = torch.cat((self.steps, steps))
            kept = min(t, self.capacity)
            slots = steps[t - kept:] % self.capacity
            for name, buffer in self.tensors.items():
                buffer.index_copy_(-2, slots, new[name][..., t - kept:, :].to(buffer.dtype))
            self.steps.index_copy_(0, slots, steps[t - kept:])
            return keys, key_steps
        slots = steps % self.capacity if self.rolling else steps
        for name, buffer in self.tensors.items():
            buffer.index_copy_(-2, slots, new[name].to(buffer.dtype))
        self.steps.index_copy_(0, slots, steps)
        return self.tensors, self.steps


def cached_mask(query_steps: torch.Tensor, key_steps: torch.Tensor, key_pad: torch.Tensor, causal: bool,
                window: Optional[int], prefix_len: Optional[torch.Tensor] = None,
                self_attention: bool = True) -> torch.Tensor:
    """Which keys each query sees: [batch, 1, t, s]. The same rules as `masks.spec_mask`
    (causal, a window on either side, a prefix that widens a causal mask), on steps."""
    q, k = query_steps[:, None], key_steps[None, :]  # [t, 1], [1, s]
    filled = (k >= 0) & (k >= key_pad[:, None, None])  # [batch, 1, s]: a written slot, not padding
    if not self_attention:  # cross-attention: every real source token
        return filled[:, None]
    rule = None
    if causal:
        rule = k <= q
    if window is not None:
        near = (q - k).abs() < window
        rule = near if rule is None else rule & near
    if rule is None:
        visible = filled.expand(-1, q.shape[0], -1)
    else:
        if prefix_len is not None and causal:
            in_prefix = (k - key_pad[:, None, None]) < prefix_len[:, None, None]  # [batch, 1, s]
            rule = rule | in_prefix
        visible = filled & rule
    return (visible | (k == q))[:, None]


def attend_cached(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decoding: DecodeInputs,
                  key_steps: torch.Tensor, key_pad: torch.Tensor, *, causal: bool, window: Optional[int] = None,
                  cap: Optional[float] = None, scale: Optional[float] = None,
                  self_attention: bool = True, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of the new queries over keys at `key_steps` (a layer's buffer); `sinks` [heads]:
    each head's sink logit (kernels.py), which needs no slot in the buffer."""
    mask = cached_mask(decoding.steps, key_steps, key_pad, causal, window,
                       decoding.prefix_len if self_attention else None, self_attention)
    bias = decoding.bias(decoding.steps, key_steps) if decoding.bias is not None and self_attention else None
    return dense_attention(q, k, v, mask, bias, cap, scale, sinks)


def step_positions(steps: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Each row's positions of the tokens at `steps`: [batch, t] (padding at 0)."""
    return (steps[None, :] - pad[:, None]).clamp(min=0)


class DecodeState:
    """A batch's decoding state across a model: every layer's buffers by stack, each row's
    padding, the step the next token takes (a 0-d tensor, so one compiled step serves
    every token), the bidirectional prefix (prefix-LM), and, until the first decoding
    step has written the cross-attention buffers, the encoder's output."""

    def __init__(self, caches: dict[str, list], pad: torch.Tensor, prefix_len: Optional[torch.Tensor] = None,
                 memory: Optional[torch.Tensor] = None):
        self.caches, self.pad, self.prefix_len, self.memory = caches, pad, prefix_len, memory
        self.step = torch.zeros((), dtype=torch.long, device=pad.device)

    def buffers(self, cross: bool = False):
        """The self-attention buffers (or, with `cross`, the cross-attention ones) of every stack."""
        for layers in self.caches.values():
            for block in layers:
                buffer = block.cross_attn if cross else block.self_attn
                if buffer is not None:
                    yield buffer

    @property
    def nbytes(self) -> int:
        """Bytes of the self-attention keys and values held (what grows while decoding)."""
        return sum(b.nbytes for b in self.buffers())

    @property
    def cross_nbytes(self) -> int:
        """Bytes of the source's keys and values (encoder-decoders; computed once per sequence)."""
        return sum(b.nbytes for b in self.buffers(cross=True))

