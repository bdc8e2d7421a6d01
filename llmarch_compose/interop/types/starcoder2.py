"""StarCoder2 (Starcoder2ForCausalLM): LLaMA's attention layout (GQA, RoPE, an optional
sliding window) with LayerNorms that have a bias, a plain (non-gated) MLP and one
`use_bias` flag for every projection of attention and MLP.

The checkpoint layout: `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.c_fc`, `mlp.c_proj`, `input_layernorm` / `post_attention_layernorm` (weight and
bias), `model.norm`, and `lm_head` only when untied.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ..fit import ANY, Expresses
from ..mapping import ModelType, TensorRule, override
from . import llama
from .common import (LAYERNORM, PLAIN, PLAIN_BACK, PLAIN_MODEL, SAME_BIAS, SPLIT_HEADS, TOPOLOGY, activation,
                     activation_back, dense, family_guess, gqa, numbers, rope, rope_back, rope_position)

# Starcoder2Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 49152, "hidden_size": 3072, "intermediate_size": 12288, "num_hidden_layers": 30,
            "num_attention_heads": 24, "num_key_value_heads": 2, "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 4096, "norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256,
            "pad_token_id": None, "rope_theta": 10000.0, "rope_parameters": None, "sliding_window": None,
            "use_bias": True, "tie_word_embeddings": True}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "norm_epsilon": "model.norm_eps",
    "use_bias": "model.attention_bias",
}
LAYER, BLOCK = llama.LAYER, llama.BLOCK
# StarCoder2 writes its tanh GELU as gelu_pytorch_tanh (the same function as gelu_new).
ACTIVATION_BACK = {**PLAIN_BACK, ("gelu", "tanh"): "gelu_pytorch_tanh"}


def starcoder2_overrides(hf: Mapping[str, Any]) -> list[str]:
    window = hf.get("sliding_window")
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'hidden_act', gated=False)}",
        "topology=decoder_only", "ffn=dense", override("model.name", "hf:starcoder2"),
        *(["attention=swa", override("model.window", window)] if window else ["attention=gqa"]),
        override("model.n_kv_heads", hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("model.mlp_bias", bool(hf["use_bias"])), *numbers(hf, NUMBERS), *rope(hf),
    ]


# One use_bias flag: on q, k, v and o (gqa's one flag) exactly when on the MLP.
EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": LAYERNORM, "activation": PLAIN,
            "attention": gqa(window=ANY), "ffn": dense(bias=SAME_BIAS), "topology": {"decoder_only": TOPOLOGY}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "norm_epsilon": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, ACTIVATION_BACK),
        "use_bias": attention.out_bias, "sliding_window": attention.window, **rope_back(spec),
    }


def with_norm_biases(rules: list[TensorRule]) -> list[TensorRule]:
    """Rules with each norm weight's bias beside it (LayerNorm where LLaMA has RMSNorm)."""
    out = []
    for rule in rules:
        out.append(rule)
        if rule.ours.endswith("norm.weight"):
            out.append(dataclasses.replace(rule, ours=rule.ours[:-len("weight")] + "bias",
                                           theirs=tuple(t[:-len("weight")] + "bias" for t in rule.theirs)))
    return out


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's attention, embedding and head rules, LayerNorm biases, and the plain MLP."""
    rules = with_norm_biases([r for r in llama.tensors(spec) if ".ffn." not in r.ours])
    for kind in ("weight", "bias") if spec.params["ffn"].bias else ("weight",):
        rules += [TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.c_fc.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.c_proj.{kind}",))]
    return rules


TYPES = (ModelType("starcoder2", "Starcoder2ForCausalLM", starcoder2_overrides, hf_config, tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
