"""StableLM (StableLmForCausalLM: StableLM-3B-4E1T, StableLM-2): LLaMA's layout with
LayerNorms that have a bias, biases on q, k and v when `use_qkv_bias` (never on the
output), a gated MLP without biases, RoPE on the first `partial_rotary_factor` of each
head (its two halves), an untied head without bias by default, and either the
sequential pre-norm block or, with `use_parallel_residual`, attention and MLP side by
side off the one `input_layernorm` (x + attn(ln(x)) + mlp(ln(x)): our
`topology.shared_norm`).

The checkpoint layout: `model.embed_tokens`, `model.layers.{i}.input_layernorm`,
`post_attention_layernorm` (sequential blocks only), `self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `model.norm`, `lm_head` (only when untied).

RoPE settings: as Phi's (`phi.rope_parameters`), with StableLmConfig's default share of
0.25 when a config.json states none. Refused: `qk_layernorm` (a LayerNorm of its own for
each head, which our QK-norm, one per layer shared by the heads, does not express).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..fit import ANY, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from . import llama, phi
from .common import (GATED, GATED_BACK, LAYERNORM, PLAIN_MODEL, SPLIT_HEADS, activation, activation_back, dense,
                     family_guess, gqa, numbers, refuse, rope, rope_position, topology)
from .starcoder2 import with_norm_biases

# StableLmConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50304, "intermediate_size": 6912, "hidden_size": 2560, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
            "max_position_embeddings": 4096, "layer_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_parameters": None, "use_qkv_bias": False, "qk_layernorm": False, "use_parallel_residual": False,
            "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "layer_norm_eps": "model.norm_eps",
    "use_qkv_bias": "model.qkv_bias",
}
DEFAULT_ROTARY_FACTOR = 0.25
LAYER, BLOCK = llama.LAYER, llama.BLOCK


def stablelm_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "qk_layernorm", "a LayerNorm of its own for each head's queries and keys")
    parallel = bool(hf["use_parallel_residual"])
    stated = {"rope_parameters": phi.rope_parameters(hf, DEFAULT_ROTARY_FACTOR),
              "max_position_embeddings": hf["max_position_embeddings"]}
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'hidden_act', gated=True)}",
        "attention=gqa", "ffn=dense", "topology=decoder_only", override("model.name", "hf:stablelm"),
        override("model.n_kv_heads", hf["num_key_value_heads"] or hf["num_attention_heads"]),
        "model.attention_bias=false", "model.mlp_bias=false",
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("topology.parallel_residual", parallel), override("topology.shared_norm", parallel),
        *numbers(hf, NUMBERS), *rope(stated),
    ]


# A parallel block always shares its one norm; the output projection is never biased.
EXPRESSES = Expresses(
    groups={"position": rope_position(fraction=ANY), "norm": LAYERNORM, "activation": GATED,
            "attention": gqa(qkv_bias=ANY, out_bias=only(False)), "ffn": dense(),
            "topology": {"decoder_only": topology(
                parallel_residual=ANY,
                shared_norm=where(lambda v, spec: v == spec.params["topology"].parallel_residual,
                                  "topology.parallel_residual", "a parallel residual with two norms"))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len,
        "layer_norm_eps": spec.params["norm"].eps, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": activation_back(spec, GATED_BACK), "use_qkv_bias": attention.qkv_bias,
        "use_parallel_residual": spec.params["topology"].parallel_residual, **phi.rope_fields(spec),
    }


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's table with LayerNorm biases; a parallel block has no post-attention norm."""
    shared = spec.params["topology"].shared_norm
    return [r for r in with_norm_biases(llama.tensors(spec)) if not (shared and ".ffn_norm." in r.ours)]


TYPES = (ModelType("stablelm", "StableLmForCausalLM", stablelm_overrides, hf_config, tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
