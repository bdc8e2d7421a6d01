"""GPT-J (GPTJForCausalLM): a parallel residual off one shared LayerNorm (x + attn(ln(x)) +
mlp(ln(x)): our `topology.shared_norm`), multi-head attention without biases, RoPE on the
first `rotary_dim` dimensions of each head in GPT-J's layout (pairs of neighbouring
dimensions rotate together, `rotate_every_two`: our `model.rope_interleaved`), base
10000 and no scaling, a plain MLP with biases of `n_inner` (4 x n_embd when left out),
and an LM head with a bias.

The checkpoint layout: `transformer.wte`, `transformer.h.{i}.ln_1`,
`attn.{q,k,v}_proj`, `attn.out_proj`, `mlp.fc_in`, `mlp.fc_out`, `transformer.ln_f`,
`lm_head` (its weight only when untied, its bias always).

Refused: a `rotary_dim` of null (transformers then builds rotary tables as wide as the
model, which do not fit a head unless there is one).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, PLAIN_MODEL, SPLIT_HEADS, activation,
                     activation_back, dense, family_guess, gqa, numbers, rope_position, topology)

# GPTJConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16,
            "rotary_dim": 64, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None, "tie_word_embeddings": False}
NUMBERS = {
    "n_embd": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
    "vocab_size": "model.vocab_size", "n_positions": "model.max_seq_len", "layer_norm_epsilon": "model.norm_eps",
}
LAYER = "transformer.h.{i}."
BLOCK = "decoder.blocks.{i}."
THETA = 10000.0  # GPT-J's rotary tables use this base, whatever a config says


def gptj_overrides(hf: Mapping[str, Any]) -> list[str]:
    heads, width = hf["n_head"], hf["n_embd"]
    head_dim = width // heads
    rotary = hf["rotary_dim"]
    if rotary is None and heads != 1:
        raise ConfigError("rotary_dim", None, "cannot be represented: transformers' GPT-J then builds rotary "
                          "tables n_embd wide, which do not fit a head", [f"an even number up to {head_dim}"])
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'activation_function', gated=False)}",
        "attention=mha", "ffn=dense", "topology=decoder_only", override("model.name", "hf:gptj"),
        override("model.n_kv_heads", heads), "model.attention_bias=false", "model.mlp_bias=true",
        override("model.ffn_dim", hf["n_inner"] or 4 * width),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("model.rope_theta", THETA), override("model.rotary_fraction", (rotary or head_dim) / head_dim),
        "model.rope_interleaved=true", "model.rope_scaling=null",
        "topology.parallel_residual=true", "topology.shared_norm=true", "topology.head_bias=param",
        *numbers(hf, NUMBERS),
    ]


EXPRESSES = Expresses(
    groups={"position": {"rope": {**rope_position(fraction=ANY, interleaved=only(True))["rope"],
                                  "theta": only(THETA), "scaling": only(None)}},
            "norm": LAYERNORM, "activation": PLAIN,
            "attention": gqa(num_kv_heads=MHA_BIASED["gqa"]["num_kv_heads"], qkv_bias=only(False),
                             out_bias=only(False)),
            "ffn": dense(bias=only(True)),
            "topology": {"decoder_only": topology(parallel_residual=only(True), shared_norm=only(True),
                                                  head_bias=only("param"))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {
        "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "layer_norm_epsilon": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "activation_function": activation_back(spec, PLAIN_BACK),
        "rotary_dim": int(spec.params["position"].rotary_dim(m.head_dim)),
    }


def tensors(spec: Any) -> list[TensorRule]:
    rules = [TensorRule("embed.tokens.weight", ("transformer.wte.weight",)),
             TensorRule("head.bias", ("lm_head.bias",)),
             TensorRule(BLOCK + "attn.qkv.weight", tuple(LAYER + f"attn.{p}_proj.weight" for p in "qkv"), "cat",
                        (spec.model.d_model,) * 3),
             TensorRule(BLOCK + "attn.out.weight", (LAYER + "attn.out_proj.weight",))]
    for kind in ("weight", "bias"):
        rules += [TensorRule(BLOCK + f"attn_norm.{kind}", (LAYER + f"ln_1.{kind}",)),
                  TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.fc_in.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.fc_out.{kind}",)),
                  TensorRule(f"decoder.final_norm.{kind}", (f"transformer.ln_f.{kind}",))]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# Older checkpoints store the causal mask, its fill value and the rotary table as buffers; a tied
# checkpoint may still store the head's weight (a copy).
IGNORE = (".attn.bias", ".attn.masked_bias", "embed_positions", "lm_head.weight")

TYPES = (ModelType("gptj", "GPTJForCausalLM", gptj_overrides, hf_config, tensors, IGNORE, expresses=EXPRESSES,
                   defaults=DEFAULTS),)

guess = family_guess(TYPES)
