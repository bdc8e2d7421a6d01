"""Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded from one
low-rank latent per token, plus one rotary key part shared by every head, so the
decoding cache holds kv_lora_rank + qk_rope_head_dim numbers per token and layer.

    q            = W_qb norm(W_qa x)            (or W_q x when q_lora_rank is null)
    [c, k_rope]  = W_kva x                      c: the latent, k_rope: the shared rotary key
    [k_nope, v]  = W_kvb norm(c)                per head
    head h       = softmax(scale * [q_nope, rot(q_rope)] . [k_nope, rot(k_rope)]) v

Only the qk_rope_head_dim rotary parts of queries and keys are rotated. Their width
is MLA's own, not the position plugin's (`model.head_dim * model.rotary_fraction`),
so with a rotary position (rope, rope_2d) each layer holds a private copy of that
plugin rebuilt at head_dim = qk_rope_head_dim with its whole width rotating, from
the plugin's own params (theta, scaling with YaRN's attention factor, dynamic NTK,
the interleaved layout): the rope code is reused, not copied. DeepSeek's checkpoints
rotate interleaved pairs (transformers' `rope_interleave`): `model.rope_interleaved=true`. `PositionInputs`
carries the shared tables (at the shared width) but not the positions, so the
private tables are built from positions 0 .. seq-1, which is what every topology
passes (and what the mask functions in `masks` assume), and the prefix length it carries.

Position encodings without rotary tables (none, learned, sinusoidal, ALiBi, T5 buckets)
work as with GQA: the rotary parts then simply stay unrotated, and score biases and
prefix masks go through the shared `scaled_dot_product` (SDPA or FlexAttention).

Module names follow transformers' DeepseekV3Attention, so its weights load by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from omegaconf import SI
from torch import nn

from llmarch_compose import Attention, BuildContext, ConfigError, PositionEncoding, PositionInputs, register
from llmarch_compose.model.cache import KVBuffer, attend_cached
from llmarch_compose.model.masks import MaskSpec, mean_attended

from ..position.rope import RotaryPosition
from .gqa import scaled_dot_product


class MLADims(NamedTuple):
    q_lora: Optional[int]
    kv_lora: int
    rope: int
    nope: int
    v: int


@dataclass
class MLAParams:
    """The MLA numbers, read from `model.`; null ones are derived from model.head_dim (h):

    - q_lora_rank: null keeps it null (queries projected directly, as DeepSeek-V2-Lite);
    - kv_lora_rank: 4 h;
    - qk_nope_head_dim: h;
    - qk_rope_head_dim: h / 2 rounded down to an even number, at least 2;
    - v_head_dim: h.

    With h = 128 these are DeepSeek-V2/V3's numbers (512, 128, 64, 128).
    """

    q_lora_rank: Optional[int] = SI("${model.q_lora_rank}")  # null: no query compression
    kv_lora_rank: Optional[int] = SI("${model.kv_lora_rank}")
    qk_rope_head_dim: Optional[int] = SI("${model.qk_rope_head_dim}")
    qk_nope_head_dim: Optional[int] = SI("${model.qk_nope_head_dim}")
    v_head_dim: Optional[int] = SI("${model.v_head_dim}")
    # Bias on q_a_proj, kv_a_proj_with_mqa and o_proj (where transformers puts `attention_bias`);
    # DeepSeek has none.
    bias: bool = SI("${model.attention_bias}")
    window: Optional[int] = None  # sliding window (keys per query, its own included), as for gqa
    scale: Optional[float] = SI("${model.attention_scale}")  # None: 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)

    def dims(self, model) -> MLADims:
        h = model.head_dim
        return MLADims(
            q_lora=self.q_lora_rank,
            kv_lora=self.kv_lora_rank if self.kv_lora_rank is not None else 4 * h,
            rope=self.qk_rope_head_dim if self.qk_rope_head_dim is not None else 2 * max(1, h // 4),
            nope=self.qk_nope_head_dim if self.qk_nope_head_dim is not None else h,
            v=self.v_head_dim if self.v_head_dim is not None else h,
        )

    def validate(self, model, key):
        for name in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{key}.{name}", value, "must be positive",
                                  "an integer >= 1, or null to derive it from model.head_dim"
                                  if name != "q_lora_rank" else "an integer >= 1, or null for no query compression")
        rope = self.dims(model).rope
        if rope % 2:
            raise ConfigError(f"{key}.qk_rope_head_dim", rope,
                              "the rotary part is rotated in pairs, so it must be even",
                              [d for d in (rope - 1, rope + 1) if d > 0])
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{key}.window", self.window, "a window must hold at least one token",
                              "an integer >= 1, or null for none")
        if self.scale is not None and self.scale <= 0:
            raise ConfigError(f"{key}.scale", self.scale, "must be positive",
                              "a number > 0, or null for 1 / sqrt(qk_nope_head_dim + qk_rope_head_dim)")


def yarn_mscale(factor: float, mscale: float) -> float:
    """DeepSeek's YaRN magnitude correction, 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


@register("attention", "mla", params=MLAParams)
class MultiHeadLatentAttention(Attention):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values from a cached low-rank
    latent, with a decoupled rotary key shared by all heads."""

    table_name = "MLA"
    reads_from_position = ("scaling.mscale_all_dim",)  # its softmax scale, under any scaling type

    def __init__(self, params: MLAParams, ctx, layer_idx: int = 0, causal: bool = True, cross: bool = False,
                 position=None):
        super().__init__()
        if cross:
            raise ConfigError("attention", params.name, "multi-head latent attention has no cross-attention form "
                              "(topology=encoder_decoder needs one in every decoder layer)",
                              "a self-attention topology (decoder_only, encoder_only, prefix_decoder), "
                              "or attention=gqa/mha/mqa with topology=encoder_decoder")
        m = ctx.model
        d = params.dims(m)
        self.n_heads, self.causal, self.window = m.n_heads, causal, params.window
        self.q_lora_rank, self.kv_lora_rank = d.q_lora, d.kv_lora
        self.qk_rope_head_dim, self.qk_nope_head_dim, self.v_head_dim = d.rope, d.nope, d.v
        qk_head_dim = d.nope + d.rope
        if d.q_lora is None:
            self.q_proj = nn.Linear(m.d_model, self.n_heads * qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(m.d_model, d.q_lora, bias=params.bias)
            self.q_a_layernorm = ctx.build("norm", dim=d.q_lora)
            self.q_b_proj = nn.Linear(d.q_lora, self.n_heads * qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(m.d_model, d.kv_lora + d.rope, bias=params.bias)
        self.kv_a_layernorm = ctx.build("norm", dim=d.kv_lora)
        self.kv_b_proj = nn.Linear(d.kv_lora, self.n_heads * (d.nope + d.v), bias=False)
        self.o_proj = nn.Linear(self.n_heads * d.v, m.d_model, bias=params.bias)

        shared = position or ctx.position
        self.rotary = self._private_rope(shared, ctx, d.rope)
        scale = params.scale if params.scale is not None else qk_head_dim ** -0.5
        scaling = getattr(getattr(shared, "params", None), "scaling", None) if self.rotary is not None else None
        # DeepSeek's YaRN softmax correction (rope_scaling.mscale_all_dim, as transformers reads it):
        # the scale is multiplied by (0.1 * mscale_all_dim * ln(factor) + 1)^2.
        if scaling is not None and scaling.mscale_all_dim:
            scale *= yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2
        self.scale = scale
        for linear in self.children():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=m.init_std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @staticmethod
    def _private_rope(shared: PositionEncoding, ctx, width: int) -> Optional[RotaryPosition]:
        """The stack's rotary position plugin rebuilt at MLA's rotary width (its whole width
        rotating), or None when the position plugin rotates nothing."""
        if not isinstance(shared, RotaryPosition):
            if type(shared).rotate is not PositionEncoding.rotate:
                raise ConfigError("position", getattr(shared, "plugin_name", type(shared).__name__),
                                  "attention=mla rotates its own rotary width (model.qk_rope_head_dim) and can "
                                  "rebuild only RotaryPosition plugins at that width",
                                  "rope, rope_2d, or a position encoding without rotation (none, learned, "
                                  "sinusoidal, alibi, relative_bias)")
            return None  # positions by embeddings or score biases: nothing to rotate
        params = shared.params
        if any(f.name == "fraction" for f in dataclasses.fields(params)):
            params = dataclasses.replace(params, fraction=1.0)
        spec = dataclasses.replace(ctx.spec, model=dataclasses.replace(ctx.model, head_dim=width))
        check = getattr(params, "validate", None)
        try:
            if check is not None:
                check(spec.model, "position")
            rope = type(shared)(params, BuildContext(spec))
            if rope.rotary_dim != width:
                raise ConfigError("position", shared.plugin_name, f"rotates {rope.rotary_dim} dimensions")
        except ConfigError as exc:
            raise ConfigError("model.qk_rope_head_dim", width,
                              f"position={shared.plugin_name} at MLA's rotary width: {exc.problem}",
                              exc.valid) from None
        return rope

    def forward(self, x: torch.Tensor, pos: PositionInputs, memory: Optional[torch.Tensor] = None,
                cache: Optional[KVBuffer] = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, nope, rope = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.unflatten(-1, (h, nope + rope)).transpose(1, 2)  # [b, h, t, nope + rope]
        latent, k_rope = self.kv_a_proj_with_mqa(x).split((self.kv_lora_rank, rope), dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.unsqueeze(1)  # [b, 1, t, rope]: one rotary key per token, for every head
        if self.rotary is not None:
            positions = pos.positions if pos.positions is not None else torch.arange(t, device=x.device)
            tables = self.rotary.attention_inputs(positions, pos.prefix_len)
            q_nope, q_rope = q.split((nope, rope), dim=-1)
            q_rope, k_rope = self.rotary.rotate(q_rope, k_rope, tables)
            q = torch.cat((q_nope, q_rope), dim=-1)
        # Nothing rotated: q stays one tensor (its split and re-concatenation, fed to a
        # score-biased attention such as ALiBi's, fails to lower in Inductor).
        if pos.decoding is not None:
            out = self._attend_latent(*q.split((nope, rope), dim=-1), latent, k_rope, pos, cache)
        else:
            kv = self.kv_b_proj(latent).unflatten(-1, (h, nope + self.v_head_dim)).transpose(1, 2)
            k_nope, v = kv.split((nope, self.v_head_dim), dim=-1)
            k = torch.cat((k_nope, k_rope.expand(b, h, t, rope)), dim=-1)  # a broadcast view until the concatenation
            out = scaled_dot_product(q, k, v, pos, self.mask_spec(), self.scale)  # v keeps its own width
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h * self.v_head_dim))

    def _attend_latent(self, q_nope, q_rope, latent, k_rope, pos: PositionInputs, cache: KVBuffer) -> torch.Tensor:
        """Decoding with the absorbed projections, as DeepSeek-V2/V3 decode: the buffer holds
        [normalized latent, rotated shared key] per token; each head's key and value
        projections fold into its query and output, so attention runs over the latent as
        one shared key/value head (MQA over kv_lora_rank + qk_rope_head_dim numbers)."""
        h, nope, r = self.n_heads, self.qk_nope_head_dim, self.kv_lora_rank
        w = self.kv_b_proj.weight.unflatten(0, (h, nope + self.v_head_dim))  # [h, nope + v, r]
        w_k, w_v = w[:, :nope], w[:, nope:]
        q = torch.cat((torch.einsum("bhtn,hnr->bhtr", q_nope, w_k), q_rope), dim=-1)
        entry = torch.cat((latent.unsqueeze(1), k_rope), dim=-1)  # [b, 1, t, r + rope]
        keys, key_steps = cache.write(pos.decoding.steps, kv=entry)
        kv = keys["kv"]
        out = attend_cached(q, kv, kv[..., :r], pos.decoding, key_steps, cache.pad, causal=self.causal,
                            window=self.window, scale=self.scale)  # [b, h, t, r]
        return torch.einsum("bhtr,hvr->bhtv", out, w_v)

    def new_cache(self, batch: int, capacity: int, pad: torch.Tensor, device=None, dtype=None) -> KVBuffer:
        rolling = self.causal and self.window is not None and self.window < capacity
        return KVBuffer(batch, self.window if rolling else capacity, pad,
                        {"kv": (1, self.kv_lora_rank + self.qk_rope_head_dim)}, rolling, device, dtype)

    def mask_spec(self) -> MaskSpec:
        return MaskSpec(self.causal, self.window)

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        # Decoding caches the latent and the shared rotary key, not per-head keys and values
        # (W_kvb is absorbed into the query and output projections). Only causal stacks decode.
        if not self.causal:
            return 0
        return (self.kv_lora_rank + self.qk_rope_head_dim) * dtype_bytes

    def kv_cache_tokens(self, context: int) -> int:
        return min(context, self.window) if self.window is not None else context

    def score_flops_per_token(self, context: int) -> float:
        # Per key seen and head: q.k over nope + rope dims, then the weighted sum over v dims,
        # 2 FLOPs per multiply-add (the naive form, keys and values expanded per head).
        dims = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        return 2 * self.n_heads * dims * mean_attended(context, self.causal, self.window)
