"""GPT-NeoX (GPTNeoXForCausalLM: GPT-NeoX-20B, Pythia): LayerNorm blocks with biases,
a parallel residual with two norms (`use_parallel_residual`: x + attn(ln1(x)) +
mlp(ln2(x)); otherwise the usual sequential pre-norm block), multi-head attention
with RoPE on the first `partial_rotary_factor` of each head (its two halves), exact
GELU, an untied head.

The checkpoint layout: `gpt_neox.embed_in`, `gpt_neox.layers.{i}.input_layernorm`,
`attention.query_key_value` (q, k, v fused head by head: our `heads` join),
`attention.dense`, `post_attention_layernorm`, `mlp.dense_h_to_4h`,
`mlp.dense_4h_to_h`, `gpt_neox.final_layer_norm`, and the head `embed_out`
(transformers 5 calls it `lm_head` in memory and reads both names: so do we).

RoPE settings: transformers takes `rope_scaling` or else `rope_parameters`, then fills
the base from `rotary_emb_base` and the rotating share from `rotary_pct`, defaulting
to 10000 and 0.25 (not 1: a config.json that says nothing rotates a quarter of each
head). Top-level `rope_theta` and `partial_rotary_factor` are not read by GPT-NeoX's
config: a file stating them otherwise than their defaults is refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, PLAIN_MODEL, SPLIT_HEADS, activation,
                     activation_back, dense, family_guess, gqa, numbers, rope, rope_back, rope_position, topology)

# GPTNeoXConfig's defaults, for config.json files that leave a field out; the older spellings
# rotary_pct and rotary_emb_base, which its published checkpoints (Pythia, NeoX-20B) use.
DEFAULTS = {"vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
            "intermediate_size": 24576, "hidden_act": "gelu", "max_position_embeddings": 2048,
            "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": None,
            "tie_word_embeddings": False, "use_parallel_residual": True, "rope_theta": 10000.0,
            "rope_parameters": None, "attention_bias": True}
EXTRA_FIELDS = {"rotary_pct": None, "rotary_emb_base": None}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "layer_norm_eps": "model.norm_eps",
    "attention_bias": "model.attention_bias",
}
LAYER = "gpt_neox.layers.{i}."
BLOCK = "decoder.blocks.{i}."


def rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The RoPE parameters GPTNeoXConfig settles on (see the module's docstring)."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    base, share = hf.get("rotary_emb_base"), hf.get("rotary_pct")
    params.setdefault("rope_theta", 10000.0 if base is None else base)
    params.setdefault("partial_rotary_factor", 0.25 if share is None else share)
    return params


def gpt_neox_overrides(hf: Mapping[str, Any]) -> list[str]:
    stated = {"rope_parameters": rope_parameters(hf), "max_position_embeddings": hf["max_position_embeddings"]}
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'hidden_act', gated=False)}",
        "attention=mha", "ffn=dense", "topology=decoder_only", override("model.name", "hf:gpt_neox"),
        override("model.n_kv_heads", hf["num_attention_heads"]), "model.mlp_bias=true",
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("topology.parallel_residual", bool(hf["use_parallel_residual"])),
        *numbers(hf, NUMBERS), *rope(stated),
    ]


# One attention_bias flag for query_key_value and dense; the MLP always biased; either block.
EXPRESSES = Expresses(
    groups={"position": rope_position(fraction=ANY), "norm": LAYERNORM, "activation": PLAIN,
            "attention": gqa(num_kv_heads=MHA_BIASED["gqa"]["num_kv_heads"]), "ffn": dense(bias=only(True)),
            "topology": {"decoder_only": topology(parallel_residual=ANY)}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m, position = spec.model, spec.params["position"]
    written = rope_back(spec)
    out = {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "intermediate_size": spec.params["ffn"].hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "layer_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, PLAIN_BACK),
        "attention_bias": spec.params["attention"].out_bias,
        "use_parallel_residual": spec.params["topology"].parallel_residual,
        # Only rope_parameters, with the rotating share stated: GPT-NeoX reads no top-level spelling.
        "rope_parameters": {**written["rope_parameters"], "partial_rotary_factor": position.fraction},
    }
    if "max_position_embeddings" in written:  # dynamic NTK scales past it
        out["max_position_embeddings"] = written["max_position_embeddings"]
    return out


def tensors(spec: Any) -> list[TensorRule]:
    heads = (spec.model.n_heads, 3)
    kinds = ("weight", "bias") if spec.params["attention"].out_bias else ("weight",)
    rules = [TensorRule("embed.tokens.weight", ("gpt_neox.embed_in.weight",))]
    for kind in kinds:
        rules += [TensorRule(BLOCK + f"attn.qkv.{kind}", (LAYER + f"attention.query_key_value.{kind}",), "heads",
                             heads),
                  TensorRule(BLOCK + f"attn.out.{kind}", (LAYER + f"attention.dense.{kind}",))]
    for kind in ("weight", "bias"):
        rules += [TensorRule(BLOCK + f"attn_norm.{kind}", (LAYER + f"input_layernorm.{kind}",)),
                  TensorRule(BLOCK + f"ffn_norm.{kind}", (LAYER + f"post_attention_layernorm.{kind}",)),
                  TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.dense_h_to_4h.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.dense_4h_to_h.{kind}",)),
                  TensorRule(f"decoder.final_norm.{kind}", (f"gpt_neox.final_layer_norm.{kind}",))]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("embed_out.weight",)))
    return rules


# Checkpoints written by older transformers store the causal mask, its fill value and the
# rotary frequencies as buffers; a tied checkpoint may still store the head (a copy).
IGNORE = (".attention.bias", ".attention.masked_bias", "rotary_emb.inv_freq", "embed_out.weight")

TYPES = (ModelType("gpt_neox", "GPTNeoXForCausalLM", gpt_neox_overrides, hf_config, tensors, IGNORE,
                   renames=(("lm_head.", "embed_out."),), expresses=EXPRESSES, defaults=DEFAULTS,
                   extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
