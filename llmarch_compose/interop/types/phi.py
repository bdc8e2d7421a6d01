"""Phi (PhiForCausalLM: Phi-1, Phi-1.5, Phi-2): a parallel residual off one shared
LayerNorm (x + attn(ln(x)) + mlp(ln(x)): our `topology.shared_norm`), attention with
biases on q, k, v and the output (`dense`), grouped key/value heads when stated, RoPE
on the first `partial_rotary_factor` of each head (its two halves), a plain MLP with
biases, an LM head with a bias (tied to the embeddings or not), and, with
`qk_layernorm`, a LayerNorm over each head's queries and keys before RoPE (one per
layer, shared by the heads: our `model.qk_norm` with the LayerNorm plugin).

The checkpoint layout: `model.embed_tokens`, `model.layers.{i}.input_layernorm`,
`self_attn.{q,k,v}_proj`, `self_attn.dense`, `self_attn.{q,k}_layernorm`, `mlp.fc1`,
`mlp.fc2`, `model.final_layernorm`, `lm_head` (its weight only when untied, its bias
always).

RoPE settings: transformers takes `rope_scaling` or else `rope_parameters`, then fills
the base from a top-level `rope_theta` (else 10000) and the rotating share from a
top-level `partial_rotary_factor`, which PhiConfig defaults to 0.5 (not 1: a config.json
that says nothing rotates half of each head). Written back, the share is stated in both
places.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, PLAIN, PLAIN_BACK, PLAIN_MODEL, SPLIT_HEADS, activation, activation_back, dense,
                     family_guess, gqa, numbers, rope, rope_back, rope_position, topology)

# PhiConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
            "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "gelu_new",
            "max_position_embeddings": 2048, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_parameters": None, "qk_layernorm": False, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": None}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "layer_norm_eps": "model.norm_eps",
}
#: What PhiConfig fills in when a config.json leaves the rotating share out.
DEFAULT_ROTARY_FACTOR = 0.5
LAYER = "model.layers.{i}."
BLOCK = "decoder.blocks.{i}."


def rope_parameters(hf: Mapping[str, Any], default_factor: Optional[float] = DEFAULT_ROTARY_FACTOR,
                    default_theta: float = 10000.0) -> dict[str, Any]:
    """The RoPE parameters transformers settles on for a config class with its own defaults
    (a rotating share, a base): the dict given (`rope_scaling`, else `rope_parameters`), then
    the top-level base and share, then the class's defaults."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta, share = hf.get("rope_theta"), hf.get("partial_rotary_factor")
    params.setdefault("rope_theta", default_theta if theta is None else theta)
    share = default_factor if share is None else share
    if share is not None:
        params.setdefault("partial_rotary_factor", share)
    return params


def rope_fields(spec: Any) -> dict[str, Any]:
    """rope_back's fields with the rotating share stated at the top and in rope_parameters (a
    reader whose class defaults the share to other than 1 takes it from either)."""
    written = rope_back(spec)
    fraction = spec.params["position"].fraction
    return {**written, "partial_rotary_factor": fraction,
            "rope_parameters": {**written["rope_parameters"], "partial_rotary_factor": fraction}}


def phi_overrides(hf: Mapping[str, Any]) -> list[str]:
    stated = {"rope_parameters": rope_parameters(hf), "max_position_embeddings": hf["max_position_embeddings"]}
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'hidden_act', gated=False)}",
        "attention=gqa", "ffn=dense", "topology=decoder_only", override("model.name", "hf:phi"),
        override("model.n_kv_heads", hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        "model.attention_bias=true", "model.mlp_bias=true", override("model.qk_norm", bool(hf["qk_layernorm"])),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "topology.parallel_residual=true", "topology.shared_norm=true", "topology.head_bias=param",
        *numbers(hf, NUMBERS), *rope(stated),
    ]


# Biases on every projection and on the head, one LayerNorm per block; QK-norm as a LayerNorm.
EXPRESSES = Expresses(
    groups={"position": rope_position(fraction=ANY), "norm": LAYERNORM, "activation": PLAIN,
            "attention": gqa(qkv_bias=only(True), out_bias=only(True), qk_norm=ANY), "ffn": dense(bias=only(True)),
            "topology": {"decoder_only": topology(parallel_residual=only(True), shared_norm=only(True),
                                                  head_bias=only("param"))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    out = {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len,
        "layer_norm_eps": spec.params["norm"].eps, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": activation_back(spec, PLAIN_BACK), "qk_layernorm": attention.qk_norm, **rope_fields(spec),
    }
    return out


def tensors(spec: Any) -> list[TensorRule]:
    m, attention = spec.model, spec.params["attention"]
    q, kv = m.n_heads * m.head_dim, attention.num_kv_heads * m.head_dim
    rules = [TensorRule("embed.tokens.weight", ("model.embed_tokens.weight",)),
             TensorRule("head.bias", ("lm_head.bias",))]
    pairs = [("attn.out", "self_attn.dense"), ("attn_norm", "input_layernorm"), ("ffn.up", "mlp.fc1"),
             ("ffn.down", "mlp.fc2")]
    if attention.qk_norm:
        pairs += [("attn.q_norm", "self_attn.q_layernorm"), ("attn.k_norm", "self_attn.k_layernorm")]
    for kind in ("weight", "bias"):
        rules.append(TensorRule(BLOCK + f"attn.qkv.{kind}", tuple(LAYER + f"self_attn.{p}_proj.{kind}" for p in "qkv"),
                                "cat", (q, kv, kv)))
        rules += [TensorRule(BLOCK + f"{ours}.{kind}", (LAYER + f"{theirs}.{kind}",)) for ours, theirs in pairs]
        rules.append(TensorRule(f"decoder.final_norm.{kind}", (f"model.final_layernorm.{kind}",)))
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store the head's weight (a copy of the embeddings).
IGNORE = ("rotary_emb.inv_freq", "lm_head.weight")

TYPES = (ModelType("phi", "PhiForCausalLM", phi_overrides, hf_config, tensors, IGNORE, expresses=EXPRESSES,
                   defaults=DEFAULTS),)

guess = family_guess(TYPES)
