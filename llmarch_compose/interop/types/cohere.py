"""Cohere (CohereForCausalLM: Command-R): attention and a gated MLP side by side off one
shared LayerNorm without bias (x + attn(ln(x)) + mlp(ln(x)): our `topology.shared_norm`
with `norm.bias=false`), grouped key/value heads, one `attention_bias` flag for q, k, v
and o, RoPE on the whole head in neighbouring pairs (our `model.rope_interleaved`), a
head tied by default, and `logit_scale` multiplying the logits (our
`topology.logit_scale`).

The checkpoint layout: LLaMA's (`model.embed_tokens`, `model.layers.{i}.input_layernorm`,
`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `model.norm`, `lm_head` when
untied), with no post-attention norm.

Refused: `use_qk_norm` (Cohere's QK LayerNorm has weights of its own for each head,
which our QK-norm, one per layer shared by the heads, does not express) and a
`logit_scale` of null (transformers multiplies by it). A config.json that states no RoPE
base means CohereConfig's, 500000.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from . import llama, phi
from .common import (GATED, GATED_BACK, PLAIN_MODEL, SPLIT_HEADS, activation, activation_back, dense, family_guess,
                     gqa, numbers, refuse, rope, rope_back, rope_position, topology)

# CohereConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 256000, "hidden_size": 8192, "intermediate_size": 22528, "logit_scale": 0.0625,
            "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": None, "hidden_act": "silu",
            "max_position_embeddings": 8192, "layer_norm_eps": 1e-5, "pad_token_id": 0, "bos_token_id": 5,
            "eos_token_id": 255001, "tie_word_embeddings": True, "rope_parameters": None,
            "attention_bias": False, "use_qk_norm": False}
DEFAULT_THETA = 500000.0  # CohereConfig's base when a config.json states none
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "layer_norm_eps": "model.norm_eps",
    "attention_bias": "model.attention_bias",
}


def cohere_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "use_qk_norm", "a LayerNorm with weights of its own for each head's queries and keys")
    stated = {"rope_parameters": phi.rope_parameters(hf, None, DEFAULT_THETA),
              "max_position_embeddings": hf["max_position_embeddings"]}
    scale = hf["logit_scale"]
    if scale is None:
        raise ConfigError("logit_scale", None, "cannot be represented: transformers' Cohere multiplies the logits "
                          "by it", ["a number"])
    return [
        "position=rope", "norm=layernorm", "norm.bias=false", f"activation={activation(hf, 'hidden_act', gated=True)}",
        "attention=gqa", "ffn=dense", "topology=decoder_only", override("model.name", "hf:cohere"),
        override("model.n_kv_heads", hf["num_key_value_heads"] or hf["num_attention_heads"]),
        "model.mlp_bias=false", "model.rope_interleaved=true",
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "topology.parallel_residual=true", "topology.shared_norm=true", override("topology.logit_scale", float(scale)),
        *numbers(hf, NUMBERS), *rope(stated),
    ]


EXPRESSES = Expresses(
    groups={"position": rope_position(interleaved=only(True)), "norm": {"layernorm": {"eps": ANY, "bias": only(False)}},
            "activation": GATED, "attention": gqa(), "ffn": dense(),
            "topology": {"decoder_only": topology(
                parallel_residual=only(True), shared_norm=only(True),
                logit_scale=where(lambda v, spec: v is not None, "a number", "logits without a factor"))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len,
        "layer_norm_eps": spec.params["norm"].eps, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": activation_back(spec, GATED_BACK), "attention_bias": attention.out_bias,
        "logit_scale": spec.params["topology"].logit_scale, "use_qk_norm": False, **rope_back(spec),
    }


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's table without the post-attention norm (one norm per block)."""
    return [r for r in llama.tensors(spec) if ".ffn_norm." not in r.ours]


TYPES = (ModelType("cohere", "CohereForCausalLM", cohere_overrides, hf_config, tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
