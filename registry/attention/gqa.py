from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from omegaconf import SI
from torch import nn
from torch.nn.attention.flex_attention import AuxRequest, flex_attention

from llmarch_compose import Attention, ConfigError, PositionEncoding, PositionInputs, register
from llmarch_compose.model.cache import KVBuffer, attend_cached
from llmarch_compose.model.kernels import dense_attention, explicit_attention, sink_rescale
from llmarch_compose.model.masks import (
    MaskSpec,
    chain,
    dense_bias,
    dense_mask,
    find_block_mask,
    is_plain,
    mean_attended,
    position_scores,
    softcap,
    spec_mask,
)
from llmarch_compose.errors import valid_divisors


QK_NORM_SCOPES = ("per_head", "whole")


@dataclass
class GQAParams:
    num_kv_heads: int = SI("${model.n_kv_heads}")  # n_heads: MHA; 1: MQA; between: GQA
    qkv_bias: bool = SI("${model.qkv_bias}")
    out_bias: bool = SI("${model.attention_bias}")
    window: Optional[int] = None  # sliding window (keys per query, its own included)
    scale: Optional[float] = SI("${model.attention_scale}")  # None: 1 / sqrt(head_dim)
    qk_norm: bool = SI("${model.qk_norm}")  # the norm plugin on the queries and keys
    # per_head: over each head's head_dim, one weight shared by the heads (Qwen3); whole: over the
    # whole projection, n_heads * head_dim queries and n_kv_heads * head_dim keys (OLMo-2)
    qk_norm_scope: str = SI("${model.qk_norm_scope}")
    # Gemma-2's cap on the scaled logits: softcap * tanh(logit / softcap)
    softcap: Optional[float] = SI("${model.attention_softcap}")
    sinks: bool = False  # gpt-oss: a learned logit per query head joins the softmax, attending to no value
    # false: this attention leaves its queries and keys unrotated by the position plugin (SmolLM3's
    # NoPE layers, set per layer through model.layer_pattern); refused with a plugin that rotates nothing
    rotary: bool = True

    def validate(self, model, key):
        if self.num_kv_heads < 1 or model.n_heads % self.num_kv_heads:
            raise ConfigError(f"{key}.num_kv_heads", self.num_kv_heads,
                              f"must divide model.n_heads={model.n_heads}",
                              valid_divisors(model.n_heads, self.num_kv_heads))
        if self.window is not None and self.window < 1:
            raise ConfigError(f"{key}.window", self.window, "a window must hold at least one token",
                              "an integer >= 1, or null for none")
        if self.qk_norm_scope not in QK_NORM_SCOPES:
            raise ConfigError(f"{key}.qk_norm_scope", self.qk_norm_scope, "unknown QK-norm scope", QK_NORM_SCOPES)
        if self.qk_norm_scope != "per_head" and not self.qk_norm:
            raise ConfigError(f"{key}.qk_norm_scope", self.qk_norm_scope, "is the scope of a QK-norm, and "
                              f"{key}.qk_norm is false", ["per_head", f"{key}.qk_norm=true"])
        if self.softcap is not None and not self.softcap > 0:
            raise ConfigError(f"{key}.softcap", self.softcap, "the cap on the attention logits must be positive",
                              "a number > 0 (Gemma-2: 50.0), or null for none")


def scaled_dot_product(q, k, v, pos: PositionInputs, spec: MaskSpec, scale: Optional[float],
                       sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention over [batch, heads, seq, dim] with the mask and score functions that `spec`
    and the position inputs ask for, through the kernel that fits:

    - nothing but causality (or nothing at all): SDPA's own causal or full attention;
    - a block mask the stack built this forward (compiled, and on CPU without gradients):
      FlexAttention, block-sparse, with the score functions fused into its kernel;
    - otherwise SDPA with the dense mask and additive bias evaluated from the same
      functions, or the scores written out when a softcap (not additive) is asked for.

    K and V keep their own head count (`enable_gqa`): they are never repeated in memory.
    `sinks` [heads] (with `spec.sinks`): each head's sink logit, in every path (kernels.py).
    """
    gqa = q.shape[1] != k.shape[1]
    b, h, q_len, k_len = q.shape[0], q.shape[1], q.shape[-2], k.shape[-2]
    plain = is_plain(spec, pos.prefix_len, pos.slopes, pos.bias) and sinks is None
    # SDPA's is_causal aligns queries to the first keys; the masks here align them to the last.
    if plain and (not spec.causal or q_len == k_len):
        return F.scaled_dot_product_attention(q, k, v, is_causal=spec.causal, scale=scale, enable_gqa=gqa)
    biases = position_scores(pos.slopes, pos.bias, k_len - q_len)
    capped = [softcap(spec.softcap)] if spec.softcap is not None else []
    block_mask = find_block_mask(pos.block_masks, spec)
    grads = q.requires_grad or (pos.bias is not None and pos.bias.requires_grad)
    if block_mask is not None and (q.device.type != "cpu" or not grads):
        # Contiguous operands: compiled on CPU (torch 2.13), FlexAttention misreads q, k, v that are
        # transposed views of one projection, computed in the same graph (checked against SDPA).
        # Inductor writes rotated q and k contiguous at no cost; v is one copy.
        out = flex_attention(q.contiguous(), k.contiguous(), v.contiguous(), score_mod=chain(*biases, *capped),
                             block_mask=block_mask, scale=scale, enable_gqa=gqa,
                             return_aux=AuxRequest(lse=True) if sinks is not None else None)
        return out if sinks is None else sink_rescale(out[0], out[1].lse, sinks)
    mask_mod = spec_mask(spec, q_len, k_len, pos.prefix_len)
    mask = dense_mask(mask_mod, b, q_len, k_len, q.device) if mask_mod is not None else None
    if capped:
        return explicit_attention(q, k, v, chain(*biases, *capped), mask,
                                  scale if scale is not None else q.shape[-1] ** -0.5, sinks)
    bias = dense_bias(chain(*biases), b, h, q_len, k_len, q.device, q.dtype) if biases else None
    return dense_attention(q, k, v, mask, bias, None, scale, sinks)


@register("attention", "gqa", params=GQAParams)
class GroupedQueryAttention(Attention):
    """Grouped-query attention: n_heads query heads share num_kv_heads key/value heads
    (MHA and MQA are its two ends), with an optional sliding window, QK-norm, and a
    cross-attention form for encoder-decoder models."""

    @classmethod
    def key_value_heads(cls, params: GQAParams, model) -> int:
        return params.num_kv_heads

    @classmethod
    def table_label(cls, params: GQAParams, model) -> str:
        label = super().table_label(params, model)  # MHA, MQA or GQA by the shared heads
        return "SWA+" + label if params.window is not None else label

    def __init__(self, params: GQAParams, ctx, layer_idx: int = 0, causal: bool = True, cross: bool = False,
                 position=None):
        super().__init__()
        m = ctx.model
        self.n_heads, self.n_kv_heads, self.head_dim = m.n_heads, params.num_kv_heads, m.head_dim
        self.causal, self.window, self.scale, self.cross = causal and not cross, params.window, params.scale, cross
        self.softcap = params.softcap
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        if cross:  # queries from the decoder, keys and values from the encoder's output
            self.q = nn.Linear(m.d_model, self.q_size, bias=params.qkv_bias)
            self.kv = nn.Linear(m.d_model, 2 * self.kv_size, bias=params.qkv_bias)
        else:  # one fused projection: one matrix product instead of three
            self.qkv = nn.Linear(m.d_model, self.q_size + 2 * self.kv_size, bias=params.qkv_bias)
        self.out = nn.Linear(self.q_size, m.d_model, bias=params.out_bias)
        self.qk_norm_whole = params.qk_norm_scope == "whole"
        q_dim, k_dim = (self.q_size, self.kv_size) if self.qk_norm_whole else (self.head_dim, self.head_dim)
        self.q_norm = ctx.build("norm", dim=q_dim) if params.qk_norm else None
        self.k_norm = ctx.build("norm", dim=k_dim) if params.qk_norm else None
        # Zero sinks start as one more key of score 0 (a softmax that may attend to nothing).
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if params.sinks else None
        # A bound method, not a submodule: the topology owns the position module.
        position = position or ctx.position
        self.rotate = position.rotate
        if not params.rotary and type(position).rotate is PositionEncoding.rotate:
            raise ConfigError("attention.rotary", False, f"position={getattr(position, 'plugin_name', '?')} "
                              "rotates no queries or keys, so there is no rotation to leave out",
                              ["true", "position=rope"])
        self.rotary = params.rotary and not cross  # no positions across the two sequences
        for linear in self.children():
            if isinstance(linear, nn.Linear):
                nn.init.normal_(linear.weight, std=m.init_std)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    def heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.unflatten(-1, (n, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, pos: PositionInputs, memory: Optional[torch.Tensor] = None,
                cache: Optional[KVBuffer] = None) -> torch.Tensor:
        b, t, _ = x.shape
        k = v = None
        if self.cross:
            q = self.q(x)
            if memory is not None:  # while decoding, only the first step brings the source
                k, v = self.kv(memory).split((self.kv_size, self.kv_size), dim=-1)
        else:
            q, k, v = self.qkv(x).split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        if self.q_norm is not None and self.qk_norm_whole:  # over all heads at once, before the split
            q = self.q_norm(q)
            k = self.k_norm(k) if k is not None else None
        q = self.heads(q, self.n_heads)
        if k is not None:
            k, v = self.heads(k, self.n_kv_heads), self.heads(v, self.n_kv_heads)
        if self.q_norm is not None and not self.qk_norm_whole:
            q = self.q_norm(q)
            k = self.k_norm(k) if k is not None else None
        if self.rotary:
            q, k = self.rotate(q, k, pos)
        if pos.decoding is not None:
            out = self._attend_cached(q, k, v, pos, cache)
        else:
            cross_spec = MaskSpec(False, softcap=self.softcap, sinks=self.sinks is not None)
            spec = cross_spec if self.cross else self.mask_spec()
            out = scaled_dot_product(q, k, v, pos if not self.cross else PositionInputs(), spec, self.scale,
                                     self.sinks)
        return self.out(out.transpose(1, 2).reshape(b, t, self.q_size))

    def _attend_cached(self, q, k, v, pos: PositionInputs, cache: KVBuffer) -> torch.Tensor:
        if self.cross:
            if k is not None:  # the source's keys and values, written once per sequence
                cache.write(torch.arange(k.shape[-2], device=k.device), k=k, v=v)
            keys, key_steps = cache.tensors, cache.steps
        else:
            keys, key_steps = cache.write(pos.decoding.steps, k=k, v=v)
        return attend_cached(q, keys["k"], keys["v"], pos.decoding, key_steps, cache.pad, causal=self.causal,
                             window=None if self.cross else self.window, cap=self.softcap, scale=self.scale,
                             self_attention=not self.cross, sinks=self.sinks)

    def new_cache(self, batch: int, capacity: int, pad: torch.Tensor, device=None, dtype=None) -> KVBuffer:
        # num_kv_heads heads, never repeated to the query heads; a causal window rolls.
        rolling = self.causal and self.window is not None and self.window < capacity
        shape = (self.n_kv_heads, self.head_dim)
        return KVBuffer(batch, self.window if rolling else capacity, pad, {"k": shape, "v": shape}, rolling,
                        device, dtype)

    def mask_spec(self) -> Optional[MaskSpec]:
        # Cross-attention sees the whole source: no block mask to build for it.
        return None if self.cross else MaskSpec(self.causal, self.window, self.softcap, self.sinks is not None)

    def kv_cache_bytes_per_token(self, dtype_bytes: int) -> int:
        # Only causal self-attention grows a cache while decoding: an encoder runs
        # once, and cross-attention's keys come from the source, not the output.
        if self.cross or not self.causal:
            return 0
        return 2 * self.n_kv_heads * self.head_dim * dtype_bytes

    def kv_cache_tokens(self, context: int) -> int:
        return min(context, self.window) if self.window is not None else context

    def score_flops_per_token(self, context: int) -> float:
        # q.k and the weighted sum of v: 2 FLOPs per multiply-add, head_dim each, per key seen.
        return 4 * self.n_heads * self.head_dim * mean_attended(context, self.causal, self.window)
