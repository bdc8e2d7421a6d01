"""BLOOM (BloomForCausalLM; bigscience/bloom, bloom-560m ... bloomz).

A pre-norm decoder with ALiBi (no position parameters; transformers adds slope x key
position, which equals our -slope x distance on every causal row under the softmax),
a LayerNorm on the embeddings (`word_embeddings_layernorm`, our `embed.norm`), biases
everywhere, a 4 x hidden_size MLP with the tanh GELU, and a tied head.

The checkpoint layout: `transformer.word_embeddings`, `transformer.h.{i}.input_layernorm`,
`self_attention.query_key_value` (fused head by head: q, k, v of head 0, then of head 1,
...; our `heads` join), `self_attention.dense`, `post_attention_layernorm`,
`mlp.dense_h_to_4h|dense_4h_to_h`, `transformer.ln_f`, `lm_head` when untied. The
released checkpoints store the base model without the `transformer.` prefix.

Refused: `apply_residual_connection_post_layernorm` (the residual taken after the
norm) and an `n_inner` other than 4 x hidden_size.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import Expresses, Rule, only
from ..mapping import ModelType, TensorRule, override
from .common import LAYERNORM, MHA_BIASED, PLAIN_MODEL, SPLIT_HEADS, dense, family_guess, refuse, topology, unused

# BloomConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "layer_norm_epsilon": 1e-5,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
            "apply_residual_connection_post_layernorm": False, "pretraining_tp": 1, "slow_but_exact": False,
            "tie_word_embeddings": True}
#: Fields the released config.json files carry that BloomConfig does not define: Megatron's
#: kernel switches and the older name of hidden_size (n_embed, which BloomConfig still reads).
EXTRA_FIELDS = {"n_embed": None, "n_inner": None, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
                "masked_softmax_fusion": True, "offset_alibi": 100, "skip_bias_add": True,
                "skip_bias_add_qkv": False, "unk_token_id": 0, "seq_length": None}
LAYER, BLOCK, BASE = "transformer.h.{i}.", "decoder.blocks.{i}.", "transformer."


def overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "apply_residual_connection_post_layernorm", "the residual taken after the input norm")
    # How Megatron fused its kernels and sliced its matmuls (slow_but_exact computes the same
    # function slice by slice), the id of an unknown token, and a training length (ALiBi has no table).
    unused(hf, "attention_softmax_in_fp32", "bias_dropout_fusion", "masked_softmax_fusion", "offset_alibi",
           "skip_bias_add", "skip_bias_add_qkv", "unk_token_id", "pretraining_tp", "slow_but_exact", "seq_length")
    width = hf["n_embed"] if hf.get("n_embed") is not None else hf["hidden_size"]
    inner = hf.get("n_inner")
    if inner is not None and inner != 4 * width:
        raise ConfigError("n_inner", inner, f"cannot be represented: BloomMLP is 4 x hidden_size = {4 * width} "
                          "wide whatever n_inner says", [None, 4 * width])
    return [
        "position=alibi", "norm=layernorm", "activation=gelu_tanh", "attention=mha", "ffn=dense",
        "topology=decoder_only", override("model.name", "hf:bloom"), override("model.d_model", width),
        override("model.n_layers", hf["n_layer"]), override("model.n_heads", hf["n_head"]),
        override("model.n_kv_heads", hf["n_head"]), override("model.ffn_dim", 4 * width),
        override("model.vocab_size", hf["vocab_size"]), override("model.norm_eps", hf["layer_norm_epsilon"]),
        "model.head_dim=null", "model.attention_scale=null", "model.attention_bias=true", "model.qkv_bias=true",
        "model.mlp_bias=true", "model.qk_norm=false", "topology.embedding_norm=true",
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
    ]


# Pre-norm LayerNorms (one epsilon) with a norm on the embeddings, ALiBi, biases everywhere,
# a 4 x d_model MLP with the tanh GELU.
EXPRESSES = Expresses(
    groups={"position": {"alibi": {}}, "norm": LAYERNORM, "activation": {"gelu": {"approximate": only("tanh")}},
            "attention": MHA_BIASED, "ffn": dense(bias=only(True)),
            "topology": {"decoder_only": topology(embedding_norm=only(True))}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS},
    rules=(Rule("ffn.hidden", lambda spec: spec.params["ffn"].hidden,
                lambda spec: spec.params["ffn"].hidden == 4 * spec.model.d_model, "4 x model.d_model",
                "an MLP other than 4 x hidden_size wide"),))


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {"hidden_size": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "vocab_size": m.vocab_size,
            "layer_norm_epsilon": spec.params["norm"].eps, "tie_word_embeddings": m.tie_embeddings,
            "apply_residual_connection_post_layernorm": False}


def tensors(spec: Any) -> list[TensorRule]:
    rules = [TensorRule("embed.tokens.weight", (BASE + "word_embeddings.weight",))]
    for kind in ("weight", "bias"):
        rules += [TensorRule(f"embed.norm.{kind}", (BASE + f"word_embeddings_layernorm.{kind}",)),
                  TensorRule(BLOCK + f"attn.qkv.{kind}", (LAYER + f"self_attention.query_key_value.{kind}",),
                             "heads", (spec.model.n_heads, 3)),
                  TensorRule(BLOCK + f"attn.out.{kind}", (LAYER + f"self_attention.dense.{kind}",)),
                  TensorRule(BLOCK + f"attn_norm.{kind}", (LAYER + f"input_layernorm.{kind}",)),
                  TensorRule(BLOCK + f"ffn_norm.{kind}", (LAYER + f"post_attention_layernorm.{kind}",)),
                  TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.dense_h_to_4h.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.dense_4h_to_h.{kind}",)),
                  TensorRule(f"decoder.final_norm.{kind}", (BASE + f"ln_f.{kind}",))]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store the head (a copy of the embeddings).
IGNORE = ("lm_head.weight",)

TYPES = (ModelType("bloom", "BloomForCausalLM", overrides, hf_config, tensors, IGNORE, prefix=BASE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
