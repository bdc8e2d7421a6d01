"""Rotary position embedding (RoFormer) with the context-extension scalings in use:
linear interpolation, dynamic NTK, LLaMA-3.1's frequency-dependent scaling and YaRN."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import SI

from llmarch_compose import ConfigError, PositionEncoding, PositionInputs, register

SCALINGS = ("linear", "dynamic", "llama3", "yarn")
#: The scaling fields each type reads (besides `type` and `factor`). `mscale_all_dim` is read
#: by YaRN only beside `mscale`, and by MLA under any type, as DeepSeek's attention does: where
#: RoPE does not read it, `read_elsewhere` hands it to the spec, which refuses it unless an
#: attention plugin chosen reads it.
READ_BY_TYPE = {
    "linear": (),
    "dynamic": ("original_max_seq_len",),
    "llama3": ("original_max_seq_len", "low_freq_factor", "high_freq_factor"),
    "yarn": ("original_max_seq_len", "beta_fast", "beta_slow", "attention_factor", "mscale", "truncate"),
}


@dataclass
class RopeScaling:
    type: str = "linear"
    factor: float = 1.0
    original_max_seq_len: Optional[int] = None  # dynamic, llama3, yarn: the pre-training context
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: Optional[float] = None  # yarn: None derives it from the factor (and mscales)
    mscale: Optional[float] = None  # yarn (DeepSeek): attention_factor = m(mscale) / m(mscale_all_dim),
    mscale_all_dim: Optional[float] = None  #   m(s) = 0.1 s ln(factor) + 1; MLA also scales its softmax
    truncate: bool = True  # yarn: round the ramp's ends out to whole dimensions (false: gpt-oss)


@dataclass
class RopeParams:
    theta: float = SI("${model.rope_theta}")
    scaling: Optional[RopeScaling] = SI("${model.rope_scaling}")
    fraction: float = SI("${model.rotary_fraction}")  # share of each head that rotates
    interleaved: bool = SI("${model.rope_interleaved}")  # rotate pairs (0,1),(2,3)... not the two halves

    def rotary_dim(self, head_dim: int) -> float:
        return head_dim * self.fraction

    def read_elsewhere(self) -> dict[str, tuple[Any, str]]:
        """Fields set here that RoPE itself does not read: {field: (value, who would)}."""
        s = self.scaling
        if s is None or s.mscale_all_dim is None:
            return {}
        if s.type == "yarn" and s.mscale and s.attention_factor is None:
            return {}  # the YaRN attention factor m(mscale) / m(mscale_all_dim)
        return {"scaling.mscale_all_dim": (s.mscale_all_dim, "yarn scaling reads it beside scaling.mscale "
                                           "(without scaling.attention_factor)")}

    def validate(self, model, key):
        rot = self.rotary_dim(model.head_dim)
        if rot != int(rot) or int(rot) % 2 or rot < 2:
            raise ConfigError(f"{key}.fraction", self.fraction,
                              f"the rotary dimension head_dim * fraction = {model.head_dim} * {self.fraction} = "
                              f"{rot:g} must be an even integer",
                              [f"{d}/{model.head_dim}" for d in range(2, model.head_dim + 1, 2)][-4:])
        if self.theta <= 0:
            raise ConfigError(f"{key}.theta", self.theta, "the RoPE base must be positive", "a number > 0")
        s = self.scaling
        if s is None:
            return
        if s.type not in SCALINGS:
            raise ConfigError(f"{key}.scaling.type", s.type, "unknown RoPE scaling", SCALINGS)
        if s.factor <= 0:
            raise ConfigError(f"{key}.scaling.factor", s.factor, "must be positive", "a number > 0")
        if s.type != "linear" and not s.original_max_seq_len:
            raise ConfigError(f"{key}.scaling.original_max_seq_len", s.original_max_seq_len,
                              f"{s.type} scaling needs the pre-training context length", "an integer >= 1")
        for field in dataclasses.fields(RopeScaling):
            value = getattr(s, field.name)
            if (field.name not in ("type", "factor", "mscale_all_dim", *READ_BY_TYPE[s.type])
                    and value != field.default):
                readers = [t for t, read in READ_BY_TYPE.items() if field.name in read]
                raise ConfigError(f"{key}.scaling.{field.name}", value, f"{s.type} scaling does not read it "
                                  f"(it is read by {' and '.join(readers)} scaling)",
                                  [repr(field.default)] + [f"{key}.scaling.type={t}" for t in readers])
        if s.type == "yarn" and s.mscale is not None and (s.mscale_all_dim is None or s.attention_factor is not None):
            raise ConfigError(f"{key}.scaling.mscale", s.mscale, "YaRN reads it only beside scaling.mscale_all_dim "
                              "and without scaling.attention_factor (the factor it would derive)",
                              ["null", f"{key}.scaling.mscale_all_dim=<value>"])
        if s.type == "llama3" and s.high_freq_factor <= s.low_freq_factor:
            raise ConfigError(f"{key}.scaling.high_freq_factor", s.high_freq_factor,
                              f"must exceed low_freq_factor={s.low_freq_factor}", f"> {s.low_freq_factor}")


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    # From Python floats (doubles, as a float64 tensor would hold): on meta this makes no real
    # tensor and runs no reference kernel (whose first call imports Dynamo).
    return torch.tensor([1.0 / theta ** (i / dim) for i in range(0, dim, 2)], dtype=torch.float64)


def llama3_inv_freq(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Long wavelengths are interpolated by `factor`, short ones kept, the band between blended."""
    low_wavelen = s.original_max_seq_len / s.low_freq_factor
    high_wavelen = s.original_max_seq_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    middle = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return torch.where(middle, blended, out)


def yarn_inv_freq(theta: float, dim: int, s: RopeScaling) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, with a linear ramp
    between the dimensions that turn `beta_slow` and `beta_fast` times in the
    original context (rounded out to whole dimensions unless `truncate` is false);
    cos and sin are scaled by the attention factor."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(s.original_max_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(s.beta_fast), correction_dim(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where the original frequency is kept
    inv_freq = base_inv_freq(theta, dim)
    inv_freq = inv_freq / s.factor * (1 - extrapolate) + inv_freq * extrapolate
    factor = s.attention_factor
    if factor is None:
        def m(scale: float) -> float:
            return 0.1 * scale * math.log(s.factor) + 1.0 if s.factor > 1 else 1.0

        factor = m(s.mscale) / m(s.mscale_all_dim) if s.mscale and s.mscale_all_dim else m(1.0)
    return inv_freq, factor


@register("position", "rope", params=RopeParams)
class RotaryPosition(PositionEncoding):
    """Rotary position embedding: queries and keys rotated by position-dependent angles,
    so their dot product depends only on the relative position."""

    @classmethod
    def table_label(cls, params: RopeParams, model) -> str:
        # Rotating part of each head (GPT-J, GPT-NeoX) is its own scheme in the survey's terms.
        return "RoPE (partial)" if params.fraction < 1.0 else "RoPE"

    def __init__(self, params: RopeParams, ctx, causal: bool = True):
        super().__init__()
        self.params = params
        self.rotary_dim = int(params.rotary_dim(ctx.model.head_dim))
        self.interleaved = params.interleaved
        self.attention_factor = 1.0
        s = params.scaling
        inv_freq = base_inv_freq(params.theta, self.rotary_dim)
        if s is not None and s.type == "linear":
            inv_freq = inv_freq / s.factor
        elif s is not None and s.type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, s)
        elif s is not None and s.type == "yarn":
            inv_freq, self.attention_factor = yarn_inv_freq(params.theta, self.rotary_dim, s)
        self.register_buffer("inv_freq", inv_freq.to(torch.float32), persistent=False)

    def _inv_freq_for(self, seq_len) -> torch.Tensor:
        """The frequencies for a forward whose highest position is seq_len - 1 (an int or a
        0-dim tensor). Dynamic NTK raises the base once seq_len outgrows the pre-training
        context, as transformers decides it: on the highest position + 1, not the number of
        positions, so offset positions scale as theirs do. Computed with tensors and
        `torch.where`, it neither specializes nor breaks the graph under torch.compile."""
        s = self.params.scaling
        if s is None or s.type != "dynamic":
            return self.inv_freq
        device = self.inv_freq.device
        original = s.original_max_seq_len
        seq = torch.as_tensor(seq_len, device=device).to(torch.float64)
        grown = seq.clamp(min=original)  # the unselected branch stays finite
        dim = self.rotary_dim
        base = self.params.theta * (s.factor * grown / original - (s.factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim
        scaled = (1.0 / base ** exponents).to(torch.float32)
        return torch.where(seq > original, scaled, self.inv_freq)

    def attention_inputs(self, positions: torch.Tensor, prefix_len=None) -> PositionInputs:
        s = self.params.scaling
        dynamic = s is not None and s.type == "dynamic"
        inv_freq = self._inv_freq_for(positions.max() + 1) if dynamic else self.inv_freq
        angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., seq, rotary_dim / 2]
        if self.interleaved:
            angles = angles.repeat_interleave(2, dim=-1)
        else:
            angles = torch.cat((angles, angles), dim=-1)
        return PositionInputs(rotary=(angles.cos() * self.attention_factor, angles.sin() * self.attention_factor),
                              prefix_len=prefix_len)

    def _rotate_pairs(self, x: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            pairs = x.unflatten(-1, (-1, 2))
            return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def _rotate_tensor(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        rotated = (rot * cos + self._rotate_pairs(rot) * sin).to(x.dtype)
        return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated

    def rotate(self, q, k, inputs: PositionInputs):
        cos, sin = inputs.rotary
        if cos.dim() == 3:  # per-batch positions [batch, seq, dim] -> broadcast over heads
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return self._rotate_tensor(q, cos, sin), self._rotate_tensor(k, cos, sin)
