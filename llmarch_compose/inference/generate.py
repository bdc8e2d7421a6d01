"""Generation: a prompt's prefill, then one token per step through the model's decode
step, reading and writing the KV cache its attention layers declare.

    out = llmarch_compose.generate(model, input_ids, max_new_tokens=32)

Batches are left-padded (an `attention_mask` of zeros then ones per row); each row stops
at its end-of-sequence token and is padded after it. Encoder-decoders take the source as
`input_ids` and decode from `model.decoder_start_token_id`; encoder-only models fill
masks instead (`fill_mask`). With `compile=True` the prefill and the one-token step are
compiled with `fullgraph=True` at static shapes (prompts padded to a multiple of
`PROMPT_BUCKET`), so decoding triggers no recompilation after the first step; on CUDA
the step is captured as a CUDA graph (`mode="reduce-overhead"`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from ..model.cache import DecodeState
from ..model.compiler import _copy_function
from ..plugin.interfaces import Topology
from ..plugin.objectives import MASKED_LM, SEQ2SEQ
from .sampling import check_sampling, choose

#: Compiled prompts are left-padded to a multiple of this, so prompts of nearby lengths share a graph.
PROMPT_BUCKET = 16
#: Compiled, the buffers hold a multiple of this many steps, so nearby lengths share a decode graph.
CAPACITY_BUCKET = 128


def _topology(model: nn.Module) -> Topology:
    inner = getattr(model, "_orig_mod", model)  # a whole-model torch.compile wrapper
    if not isinstance(inner, Topology) or getattr(inner, "spec", None) is None:
        raise TypeError(f"generate takes a model built by llmarch_compose.build, not {type(model).__name__}")
    return inner


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _left_padding(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Each row's count of leading padding; refuses masks that are not left padding."""
    if attention_mask is None:
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ConfigError("attention_mask", tuple(attention_mask.shape), "must have the shape of input_ids",
                          [tuple(input_ids.shape)])
    mask = attention_mask.to(torch.bool)
    pad = (~mask).cumprod(dim=-1).sum(dim=-1)  # leading zeros
    if bool((mask.sum(dim=-1) + pad != mask.shape[-1]).any()):
        raise ConfigError("attention_mask", "right or inner padding", "generation pads on the left: zeros, then ones",
                          "a mask of leading zeros (padding) then ones per row")
    if bool((pad == mask.shape[-1]).any()):
        raise ConfigError("input_ids", "an empty row", "every row needs at least one token", "a non-empty prompt")
    return pad.to(input_ids.device)


def _check_ids(name: str, ids: torch.Tensor, vocab: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int):
        raise ConfigError(name, getattr(ids, "shape", type(ids).__name__), "must be token ids [batch, length]",
                          "a 2-D integer tensor")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ConfigError(name, tuple(ids.shape), "is empty", "at least one row of at least one token")
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ConfigError(name, "out of range", f"token ids must lie in [0, model.vocab_size={vocab})",
                          f"ids 0 .. {vocab - 1}")


class _Stepper:
    """The model's decode step, eager or compiled once per model (a private code object,
    so its graphs and recompile counts are its own)."""

    def __init__(self, model: Topology, compiled: bool):
        self.model = model
        self.compiled = compiled
        if compiled:
            cuda = next(model.parameters()).device.type == "cuda"
            step = _copy_function(_decode_step)
            self.fn = torch.compile(step, fullgraph=True, dynamic=False, mode="reduce-overhead" if cuda else None)
        else:
            self.fn = _decode_step

    def __call__(self, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
        logits = self.fn(self.model, input_ids, state)
        return logits.clone() if self.compiled else logits  # a CUDA graph reuses its output buffer


def _decode_step(model: Topology, input_ids: torch.Tensor, state: DecodeState) -> torch.Tensor:
    return model.decode_step(input_ids, state).logits[:, -1]


def stepper(model: Topology, compiled: bool) -> _Stepper:
    """The decode step of `model`, kept on it so later calls reuse its compiled graphs."""
    kept = model.__dict__.setdefault("_decode_steppers", {})
    if compiled not in kept:
        kept[compiled] = _Stepper(model, compiled)
    return kept[compiled]


def _bucketed(ids: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ids` left-padded to a multiple of PROMPT_BUCKET (one compiled graph for nearby lengths).
    The padding is masked, so any id of the vocabulary serves: 0, never the end or padding
    id, which may lie outside it (an end id no model emits)."""
    extra = -ids.shape[1] % PROMPT_BUCKET
    if not extra:
        return ids, pad
    return torch.cat((ids.new_zeros((ids.shape[0], extra)), ids), dim=1), pad + extra


def _capacity(needed: int, compiled: bool) -> int:
    """Steps the buffers hold: exactly what is needed, or, compiled, a multiple of CAPACITY_BUCKET
    (one decode graph for nearby lengths; the extra slots stay empty and masked)."""
    return -(-needed // CAPACITY_BUCKET) * CAPACITY_BUCKET if compiled else needed


def _mark_static(state: DecodeState) -> None:
    """CUDA graphs replay fixed addresses: the buffers are written in place, never replaced."""
    tensors = [state.step, state.pad, *(t for b in state.buffers() for t in (*b.tensors.values(), b.steps))]
    tensors += [t for b in state.buffers(cross=True) for t in (*b.tensors.values(), b.steps)]
    for t in tensors:
        torch._dynamo.mark_static_address(t)


@torch.no_grad()
def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, attention_mask: Optional[torch.Tensor] = None,
             seed: Optional[int] = None, pad_token_id: Optional[int] = None, compile: bool = False,
             on_token: Optional[Callable[[torch.Tensor], None]] = None) -> torch.LongTensor:
    """The prompt followed by up to `max_new_tokens` new tokens per row: [batch, length + n]
    (for an encoder-decoder: the decoder's tokens, from its start token). Rows that end
    early are filled with `pad_token_id` (default: the model's, else the end token).
    `eos_token_id` defaults to the model's (`model.eos_token_id`); `on_token` receives each
    step's new tokens [batch] as they are chosen (streaming)."""
    topology = _topology(model)
    numbers = topology.spec.model
    if topology.objective is MASKED_LM:
        raise ConfigError("topology", getattr(topology, "plugin_name", type(topology).__name__),
                          "an encoder-only model does not generate left to right", "fill_mask(model, input_ids)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError("max_new_tokens", max_new_tokens, "counts the tokens to generate", "an integer >= 0")
    check_sampling(temperature, top_k, top_p)
    vocab = numbers.vocab_size
    _check_ids("input_ids", input_ids, vocab)
    device = next(topology.parameters()).device
    input_ids = input_ids.to(device)
    pad = _left_padding(input_ids, attention_mask.to(device) if attention_mask is not None else None)
    seq2seq = topology.objective is SEQ2SEQ
    limit = numbers.max_seq_len
    prompt_len = input_ids.shape[1]
    longest = int((prompt_len - pad).max())
    if limit is not None and longest > limit:
        raise ConfigError("input_ids", f"{longest} tokens", f"longer than model.max_seq_len={limit}",
                          f"a prompt of at most {limit} tokens")
    decoded_len = (1 if seq2seq else longest) + max_new_tokens
    if limit is not None and decoded_len > limit:
        raise ConfigError("max_new_tokens", max_new_tokens,
                          f"{'the start token' if seq2seq else f'the {longest}-token prompt'} plus {max_new_tokens} "
                          f"new tokens pass model.max_seq_len={limit}",
                          f"at most {limit - decoded_len + max_new_tokens}")
    eos = _token_ids(eos_token_id if eos_token_id is not None else getattr(numbers, "eos_token_id", None))
    fill = pad_token_id if pad_token_id is not None else getattr(numbers, "pad_token_id", None)
    fill = fill if fill is not None else (eos[0] if eos else 0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = topology.training
    topology.eval()
    try:
        step = stepper(topology, compile)
        batch = input_ids.shape[0]
        if seq2seq:
            start = getattr(numbers, "decoder_start_token_id", None)
            if start is None:
                raise ConfigError("model.decoder_start_token_id", None, "an encoder-decoder decodes from a start token",
                                  "a token id (T5: 0, its padding id; BART: 2)")
            prompt = torch.full((batch, 1), start, dtype=torch.long, device=device)
            source, source_pad = input_ids, pad
            if compile:
                source, source_pad = _bucketed(source, source_pad)
            state = topology.new_decode_state(batch, _capacity(1 + max_new_tokens, compile), source_ids=source,
                                              source_pad=source_pad)
            out = prompt
        else:
            prompt = input_ids
            if compile:
                prompt, pad = _bucketed(prompt, pad)
            prefix_len = (prompt.shape[1] - pad) if getattr(topology, "prefix_lm", False) else None
            state = topology.new_decode_state(batch, _capacity(prompt.shape[1] + max_new_tokens, compile), pad,
                                              prefix_len=prefix_len)
            out = input_ids
        if compile and device.type == "cuda":
            _mark_static(state)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        eos_ids = torch.tensor(eos, dtype=torch.long, device=device) if eos else None
        new = []
        logits = step(prompt, state) if max_new_tokens else None
        state.memory = None  # the cross-attention buffers now hold the source's keys and values
        for i in range(max_new_tokens):
            token = choose(logits, do_sample, temperature, top_k, top_p, generator)
            token = torch.where(done, torch.full_like(token, fill), token)
            new.append(token)
            if on_token is not None:
                on_token(token)
            if eos_ids is not None:
                done = done | torch.isin(token, eos_ids)
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = step(token[:, None], state)
        return torch.cat((out, torch.stack(new, dim=1)), dim=1) if new else out
    finally:
        topology.train(was_training)


@torch.no_grad()
def fill_mask(model: nn.Module, input_ids: torch.Tensor, mask_token_id: int,
              attention_mask: Optional[torch.Tensor] = None) -> torch.LongTensor:
    """`input_ids` with every `mask_token_id` replaced by the model's likeliest token there
    (an encoder-only model's natural inference); a left-padded batch takes its mask."""
    topology = _topology(model)
    if topology.objective is not MASKED_LM:
        raise ConfigError("topology", getattr(topology, "plugin_name", type(topology).__name__),
                          "fill_mask is for encoder-only (masked-LM) models", "generate(model, input_ids, n)")
    vocab = topology.spec.model.vocab_size
    _check_ids("input_ids", input_ids, vocab)
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise ConfigError("mask_token_id", mask_token_id, "must be a token id of the model", f"0 .. {vocab - 1}")
    device = next(topology.parameters()).device
    input_ids = input_ids.to(device)
    pad = _left_padding(input_ids, attention_mask.to(device) if attention_mask is not None else None)
    was_training = topology.training
    topology.eval()
    try:
        state = topology.new_decode_state(input_ids.shape[0], input_ids.shape[1], pad)
        logits = topology.decode_step(input_ids, state, all_logits=True).logits
    finally:
        topology.train(was_training)
    return torch.where(input_ids == mask_token_id, logits.argmax(dim=-1), input_ids)


__all__ = ["generate", "fill_mask", "stepper", "PROMPT_BUCKET"]
