"""GPT-2 (GPT2LMHeadModel): pre-norm LayerNorm blocks with biases, learned positions,
a tied head.

The checkpoint layout: `transformer.wte` / `transformer.wpe`, `transformer.h.{i}.ln_1`,
`attn.c_attn` (q|k|v already fused), `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`,
`transformer.ln_f`, and `lm_head` only when untied. The projections are Conv1D,
stored [in, out]: each weight is transposed (`t`), the biases copied.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, SPLIT_HEADS, TOPOLOGY, activation,
                     activation_back, dense, family_guess, numbers, refuse, unused)

# GPT2Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "scale_attn_weights": True, "tie_word_embeddings": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "add_cross_attention": False, "bos_token_id": 50256,
            "eos_token_id": 50256, "pad_token_id": None, "summary_type": "cls_index", "summary_use_proj": True,
            "summary_activation": None, "summary_proj_to_labels": True}
NUMBERS = {
    "n_embd": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
    "vocab_size": "model.vocab_size", "n_positions": "model.max_seq_len", "layer_norm_epsilon": "model.norm_eps",
}
LAYER = "transformer.h.{i}."
BLOCK = "decoder.blocks.{i}."


def gpt2_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "scale_attn_by_inverse_layer_idx", "attention scores divided by the layer index + 1 per layer")
    refuse(hf, "reorder_and_upcast_attn", "attention scores upcast to fp32 in a reordered product")
    refuse(hf, "add_cross_attention", "cross-attention blocks in a decoder-only model")
    # The sequence-summary head of GPT2DoubleHeadsModel: not part of the language model.
    unused(hf, "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels")
    out = [
        "position=learned", "norm=layernorm", f"activation={activation(hf, 'activation_function', gated=False)}",
        "attention=mha", "ffn=dense", "topology=decoder_only", override("model.name", "hf:gpt2"),
        override("model.n_kv_heads", hf["n_head"]), override("model.ffn_dim", hf["n_inner"] or 4 * hf["n_embd"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "model.attention_bias=true", "model.mlp_bias=true", *numbers(hf, NUMBERS),
    ]
    if not hf["scale_attn_weights"]:  # raw q.k scores
        out.append(override("model.attention_scale", 1.0))
    return out


# Pre-norm LayerNorm blocks with biases everywhere, absolute positions from row 0, multi-head
# attention scaled by 1/sqrt(head_dim) or not at all (scale_attn_weights).
EXPRESSES = Expresses(
    groups={"position": {"learned": {"max_positions": ANY, "offset": only(0)}}, "norm": LAYERNORM,
            "activation": PLAIN, "attention": {"gqa": {**MHA_BIASED["gqa"], "scale": only(None, 1.0)}},
            "ffn": dense(bias=only(True)), "topology": {"decoder_only": TOPOLOGY}},
    model={"head_dim": SPLIT_HEADS, "tie_embeddings": ANY, "embedding_dim": only(None), "type_vocab_size": only(0)})


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {
        "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "n_positions": spec.params["position"].max_positions,
        "layer_norm_epsilon": spec.params["norm"].eps, "activation_function": activation_back(spec, PLAIN_BACK),
        "tie_word_embeddings": m.tie_embeddings, "scale_attn_weights": spec.params["attention"].scale is None,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    }


def tensors(spec: Any) -> list[TensorRule]:
    rules = [
        TensorRule("embed.tokens.weight", ("transformer.wte.weight",)),
        TensorRule("position.table.weight", ("transformer.wpe.weight",)),
        TensorRule(BLOCK + "attn.qkv.weight", (LAYER + "attn.c_attn.weight",), "t"),
        TensorRule(BLOCK + "attn.out.weight", (LAYER + "attn.c_proj.weight",), "t"),
        TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.c_fc.weight",), "t"),
        TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.c_proj.weight",), "t"),
        TensorRule(BLOCK + "attn.qkv.bias", (LAYER + "attn.c_attn.bias",)),
        TensorRule(BLOCK + "attn.out.bias", (LAYER + "attn.c_proj.bias",)),
        TensorRule(BLOCK + "ffn.up.bias", (LAYER + "mlp.c_fc.bias",)),
        TensorRule(BLOCK + "ffn.down.bias", (LAYER + "mlp.c_proj.bias",)),
    ]
    for ours, theirs in (("attn_norm", LAYER + "ln_1"), ("ffn_norm", LAYER + "ln_2"),
                         ("decoder.final_norm", "transformer.ln_f")):
        ours = ours if ours.startswith("decoder.") else BLOCK + ours
        rules += [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# Checkpoints written before transformers 4.x dropped them store the causal mask
# (`attn.bias`) and its fill value (`attn.masked_bias`) as buffers; a tied
# checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

# openai-community/gpt2 stores GPT2Model's names without the "transformer." prefix.
TYPES = (ModelType("gpt2", "GPT2LMHeadModel", gpt2_overrides, hf_config, tensors, IGNORE, prefix="transformer.",
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
