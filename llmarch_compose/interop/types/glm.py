"""The GLM family: glm (GLM-4, transformers' GlmForCausalLM), ChatGLM-3's successor layout,
and glm4 (GLM-4-0414, Glm4ForCausalLM).

A LLaMA-like decoder with three differences: RoPE turns only the first
`partial_rotary_factor` (0.5) of each head, in interleaved pairs (ChatGLM's
layout: `model.rope_interleaved`); `attention_bias` puts biases on q, k and v
but never on o_proj; the MLP stores gate|up fused as `mlp.gate_up_proj`, which
is our `ffn.up` as is.

glm4 adds a norm after each sublayer (`topology.norm_position=sandwich`:
`post_self_attn_layernorm` follows attention, `post_attention_layernorm` and
`post_mlp_layernorm` wrap the MLP); everything else is glm's.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from . import llama
from .common import (GATED, GATED_BACK, PLAIN_MODEL, RMSNORM, TOPOLOGY, activation_back, dense, family_guess, gqa,
                     rope_back, rope_position, topology)

# GlmConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1.5625e-07, "tie_word_embeddings": False,
            "rope_theta": 10000.0, "rope_parameters": None, "attention_bias": True, "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338], "bos_token_id": None}

ROTARY_FRACTION = 0.5  # GlmConfig's partial_rotary_factor when neither spelling gives it
LAYER, BLOCK = llama.LAYER, llama.BLOCK


def overrides(hf: Mapping[str, Any], name: str = "glm") -> list[str]:
    if hf.get("sliding_window"):
        raise ConfigError("sliding_window", hf["sliding_window"], "cannot be represented: GlmForCausalLM has "
                          "no sliding window (its attention ignores the field)", [None])
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if fraction is None:
        fraction = ROTARY_FRACTION
    bias = bool(hf["attention_bias"])  # q, k and v only
    out = [o for o in llama._overrides(hf, name, window_key="_never") if not o.startswith("model.rotary_fraction=")]
    return [*out, override("model.rotary_fraction", float(fraction)), "model.rope_interleaved=true",
            override("model.qkv_bias", bias), "model.attention_bias=false", "model.mlp_bias=false"]


# A LLaMA-shaped decoder that rotates interleaved pairs of any leading share of each head,
# biases q, k and v (never o) and has no window.
EXPRESSES = Expresses(
    groups={"position": rope_position(fraction=ANY, interleaved=only(True)), "norm": RMSNORM,
            "activation": GATED, "attention": gqa(qkv_bias=ANY, out_bias=only(False)), "ffn": dense(),
            "topology": {"decoder_only": TOPOLOGY}},
    model=PLAIN_MODEL)


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    rope = rope_back(spec)
    # Always explicit: GlmConfig reads a missing partial_rotary_factor as 0.5.
    rope["partial_rotary_factor"] = spec.params["position"].fraction
    rope["rope_parameters"]["partial_rotary_factor"] = spec.params["position"].fraction
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim,
        "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, GATED_BACK),
        "attention_bias": attention.qkv_bias, **rope,
    }


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's attention, norm and embedding rules; the fused gate|up copied as it is."""
    rules = [r for r in llama.tensors(spec) if ".ffn." not in r.ours]
    return [*rules, TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.gate_up_proj.weight",)),
            TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.down_proj.weight",))]


# ------------------------------------------------------------------ glm4

DEFAULTS4 = dict(DEFAULTS)  # Glm4Config()'s defaults are GlmConfig()'s


def glm4_overrides(hf: Mapping[str, Any]) -> list[str]:
    return [*overrides(hf, "glm4"), "topology.norm_position=sandwich"]


def glm4_tensors(spec: Any) -> list[TensorRule]:
    """glm's rules with the sandwich's four norms per layer: post_attention_layernorm is the
    norm before the MLP (our ffn_norm), as in glm."""
    return [*tensors(spec), *(TensorRule(BLOCK + ours, (LAYER + theirs,)) for ours, theirs in (
        ("attn_post_norm.weight", "post_self_attn_layernorm.weight"),
        ("ffn_post_norm.weight", "post_mlp_layernorm.weight")))]


EXPRESSES4 = Expresses(
    groups={**EXPRESSES.groups, "topology": {"decoder_only": topology(norm_position=only("sandwich"))}},
    model=PLAIN_MODEL)

TYPES = (ModelType("glm", "GlmForCausalLM", overrides, hf_config, tensors, llama.IGNORE, expresses=EXPRESSES,
                   defaults=DEFAULTS),
         ModelType("glm4", "Glm4ForCausalLM", glm4_overrides, hf_config, glm4_tensors, llama.IGNORE,
                   expresses=EXPRESSES4, defaults=DEFAULTS4))

guess = family_guess(TYPES)
