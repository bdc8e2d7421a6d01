"""Phi-3 (Phi3ForCausalLM; Phi-3 and Phi-4): LLaMA's block with fused projections.

The checkpoint layout: `model.layers.{i}.self_attn.qkv_proj` (q, k and v rows in that order:
our fused `attn.qkv` as it is), `self_attn.o_proj`, `mlp.gate_up_proj` (the gate's rows, then
the up-projection's: our gated `ffn.up` as it is), `mlp.down_proj`, `input_layernorm` /
`post_attention_layernorm` (RMSNorm), `model.norm`, `lm_head`. No biases anywhere; a
sliding window (every layer) when `sliding_window` is set; a share of each head rotating
(`partial_rotary_factor`).

Refused: any RoPE scaling. Phi3Config reads `su`, `yarn` and `longrope` all as its LongRoPE
(per-frequency short and long factors, switched at original_max_position_embeddings), which
no position plugin computes.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule
from . import llama
from .common import (GATED, PLAIN_MODEL, RMSNORM, SPLIT_HEADS, TOPOLOGY, dense, family_guess, gqa, refuse,
                     rope_position, unused)

# Phi3Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
            "max_position_embeddings": 4096, "original_max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_parameters": None, "bos_token_id": 1,
            "eos_token_id": 32000, "pad_token_id": 32000, "sliding_window": None}
# The released configs also say attention_bias (false); Phi3Config has no such field and no biases.
EXTRA_FIELDS = {"attention_bias": False}
LAYER, BLOCK = llama.LAYER, llama.BLOCK


def phi3_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "attention_bias", "Phi-3's projections have no biases")
    for field in ("rope_parameters", "rope_scaling"):
        rope = hf.get(field) or {}
        kind = rope.get("rope_type") or rope.get("type") or "default"
        if kind != "default":
            raise ConfigError(field, rope, "cannot be represented: Phi-3 reads su, yarn and longrope as its "
                              "LongRoPE (per-frequency short and long factors)", ["null", "rope_type default"])
    unused(hf, "original_max_position_embeddings")  # read by LongRoPE alone
    return llama._overrides(hf, "phi3", window_key="sliding_window")


def phi3_config(spec: Any) -> dict[str, Any]:
    out = {k: v for k, v in llama.hf_config(spec).items() if k in TYPES[0].fields}
    for legacy in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        out.pop(legacy, None)
    # Only rope_parameters, with the rotating share stated (no scaling: the fit check refuses it).
    rope = {**out["rope_parameters"], "partial_rotary_factor": spec.params["position"].fraction}
    return {**out, "rope_parameters": rope, "original_max_position_embeddings": spec.model.max_seq_len}


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's embedding, norm, output and head rules; q|k|v and gate|up fused as ours are."""
    fused = (BLOCK + "attn.qkv.weight", BLOCK + "ffn.up.weight", BLOCK + "ffn.down.weight")
    rules = [r for r in llama.tensors(spec) if r.ours not in fused]
    return [*rules, TensorRule(BLOCK + "attn.qkv.weight", (LAYER + "self_attn.qkv_proj.weight",)),
            TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.gate_up_proj.weight",)),
            TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.down_proj.weight",))]


# No biases, a window on every layer or none, partial rotary, no RoPE scaling; head_dim is hidden / heads.
POSITION = {"rope": {**rope_position(fraction=ANY)["rope"],
                     "scaling.type": only(why="a RoPE scaling (Phi-3's own is LongRoPE, which no plugin computes)")}}
EXPRESSES = Expresses(
    groups={"position": POSITION, "norm": RMSNORM, "activation": GATED,
            "attention": gqa(qkv_bias=only(False), out_bias=only(False), window=ANY), "ffn": dense(),
            "topology": {"decoder_only": TOPOLOGY}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})

TYPES = (ModelType("phi3", "Phi3ForCausalLM", phi3_overrides, phi3_config, tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
