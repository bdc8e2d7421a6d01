"""OPT (OPTForCausalLM): GPT-2's block with nn.Linear projections, learned positions
whose table keeps 2 rows before position 0, ReLU, and one `enable_bias` flag for every
projection. `do_layer_norm_before` chooses pre-norm (every size but 350m) or post-norm
(norm(x + f(x)), no final norm).

The checkpoint layout: `model.decoder.embed_tokens`, `model.decoder.embed_positions`
(max_position_embeddings + 2 rows), `model.decoder.layers.{i}.self_attn.{q,k,v,out}_proj`,
`self_attn_layer_norm`, `fc1`, `fc2`, `final_layer_norm` (the FFN's norm),
`model.decoder.final_layer_norm`, and `lm_head` only when untied.

Not representable, refused by field: `word_embed_proj_dim` other than hidden_size (OPT-350m's
narrow embeddings, projected in and out without bias), `_remove_final_layer_norm` (a
pre-norm stack without its final norm), and norms without weights
(`layer_norm_elementwise_affine: false`). Its norms use nn.LayerNorm's eps, 1e-5.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (MHA_BIASED, PLAIN, PLAIN_BACK, PLAIN_MODEL, SAME_BIAS, SPLIT_HEADS, activation,
                     activation_back, dense, family_guess, gqa, numbers, refuse, topology)

# OPTConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
            "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
            "word_embed_proj_dim": None, "num_attention_heads": 12, "activation_function": "relu",
            "pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, "enable_bias": True,
            "layer_norm_elementwise_affine": True, "tie_word_embeddings": True}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "ffn_dim": "model.ffn_dim", "vocab_size": "model.vocab_size", "max_position_embeddings": "model.max_seq_len",
    "enable_bias": "model.attention_bias",
}
OFFSET = 2  # rows of the position table before position 0
EPS = 1e-5  # nn.LayerNorm's default: OPT states none
LAYER = "model.decoder.layers.{i}."
BLOCK = "decoder.blocks.{i}."


def opt_overrides(hf: Mapping[str, Any]) -> list[str]:
    width = hf.get("word_embed_proj_dim")
    if width not in (None, hf["hidden_size"]):
        raise ConfigError("word_embed_proj_dim", width, "cannot be represented: embeddings narrower than "
                          "hidden_size, projected in and out without bias (OPT-350m)", [None, hf["hidden_size"]])
    refuse(hf, "_remove_final_layer_norm", "a pre-norm stack without its final norm")
    refuse(hf, "layer_norm_elementwise_affine", "LayerNorms without weight and bias", allowed=(True,))
    return [
        "position=learned", "norm=layernorm", f"activation={activation(hf, 'activation_function', gated=False)}",
        "attention=mha", "ffn=dense", "topology=decoder_only", override("model.name", "hf:opt"),
        override("model.n_kv_heads", hf["num_attention_heads"]), override("model.mlp_bias", bool(hf["enable_bias"])),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("model.position_offset", OFFSET), override("model.norm_eps", EPS),
        override("topology.norm_position", "pre" if hf["do_layer_norm_before"] else "post"),
        *numbers(hf, NUMBERS),
    ]


# Multi-head attention and MLP biased together or not at all; pre- or post-norm blocks.
EXPRESSES = Expresses(
    groups={"position": {"learned": {"max_positions": ANY, "offset": only(OFFSET)}},
            "norm": {"layernorm": {"eps": only(EPS), "bias": only(True)}}, "activation": PLAIN,
            "attention": gqa(num_kv_heads=MHA_BIASED["gqa"]["num_kv_heads"]), "ffn": dense(bias=SAME_BIAS),
            "topology": {"decoder_only": topology(norm_position=only("pre", "post"))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {
        "hidden_size": m.d_model, "word_embed_proj_dim": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "ffn_dim": spec.params["ffn"].hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": spec.params["position"].max_positions,
        "do_layer_norm_before": spec.params["topology"].norm_position == "pre", "_remove_final_layer_norm": False,
        "layer_norm_elementwise_affine": True, "enable_bias": spec.params["attention"].out_bias,
        "activation_function": activation_back(spec, PLAIN_BACK), "tie_word_embeddings": m.tie_embeddings,
    }


def tensors(spec: Any) -> list[TensorRule]:
    d = spec.model.d_model
    rules = [TensorRule("embed.tokens.weight", ("model.decoder.embed_tokens.weight",)),
             TensorRule("position.table.weight", ("model.decoder.embed_positions.weight",))]
    biased = ("weight", "bias") if spec.params["attention"].out_bias else ("weight",)
    for kind in biased:
        rules += [TensorRule(BLOCK + f"attn.qkv.{kind}", tuple(LAYER + f"self_attn.{p}_proj.{kind}" for p in "qkv"),
                             "cat", (d, d, d)),
                  TensorRule(BLOCK + f"attn.out.{kind}", (LAYER + f"self_attn.out_proj.{kind}",)),
                  TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"fc1.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"fc2.{kind}",))]
    norms = [(BLOCK + "attn_norm", LAYER + "self_attn_layer_norm"), (BLOCK + "ffn_norm", LAYER + "final_layer_norm")]
    if spec.params["topology"].norm_position == "pre":
        norms.append(("decoder.final_norm", "model.decoder.final_layer_norm"))
    rules += [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",))
              for ours, theirs in norms for kind in ("weight", "bias")]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = ("lm_head.weight",)

TYPES = (ModelType("opt", "OPTForCausalLM", opt_overrides, hf_config, tensors, IGNORE, expresses=EXPRESSES,
                   defaults=DEFAULTS),)

guess = family_guess(TYPES)
