"""BERT (BertForMaskedLM): a post-norm encoder with learned positions, token types,
an embedding LayerNorm and the masked-LM head; `topology=encoder_only`.

The checkpoint layout: `bert.embeddings.{word,position,token_type}_embeddings`,
`bert.embeddings.LayerNorm`, `bert.encoder.layer.{i}.attention.self.{query,key,value}`
(fused into our qkv), `attention.output.dense` and `.LayerNorm` (our attn_norm:
post-norm), `intermediate.dense`, `output.dense` and `.LayerNorm` (our ffn_norm),
and the head `cls.predictions.transform.{dense,LayerNorm}` and `cls.predictions.bias`;
the decoder matrix is the word embeddings unless untied.

The pooler (`bert.pooler.dense`) and the next-sentence head (`cls.seq_relationship`)
of BertForPreTraining checkpoints (google-bert/bert-base-uncased included) are not
part of BertForMaskedLM and are ignored, as transformers does when it loads them into
BertForMaskedLM. With `topology.pooler=true` among from_hf's overrides, the pooler is
read into our `pooler` (and then required), and to_hf writes it back.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..hf import ModelType, TensorRule, override
from .common import activation, ensure_fits, first_failed, numbers, refuse, wrong_plugin_or_topology

# BertConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "tie_word_embeddings": True}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "type_vocab_size": "model.type_vocab_size",
    "layer_norm_eps": "model.norm_eps",
}
# Our (activation plugin, GELU approximation) -> HF hidden_act
ACTIVATIONS_BACK = {("gelu", "none"): "gelu", ("gelu", "tanh"): "gelu_new", ("relu", None): "relu",
                    ("silu", None): "silu"}
LAYER = "bert.encoder.layer.{i}."
BLOCK = "encoder.blocks.{i}."
# BERT's layout is encoder_only's default; any other option changes the maths.
TOPOLOGY = {"norm_position": "post", "parallel_residual": False, "residual": "standard", "share_layers": False,
            "embedding_norm": True, "mlm_transform": True, "head_bias": "param", "scale_tied_head": False,
            "normalize_head": False}


def bert_overrides(hf: Mapping[str, Any]) -> list[str]:
    hf = {**DEFAULTS, **hf}
    refuse(hf, "position_embedding_type", "relative position embeddings (only absolute ones map)",
           allowed=(None, "absolute"))
    refuse(hf, "is_decoder", "a causal BERT (BertLMHeadModel); encoder_only attends both ways")
    refuse(hf, "add_cross_attention", "cross-attention blocks in an encoder")
    return [
        "position=learned", "norm=layernorm", f"activation={activation(hf, 'hidden_act', gated=False)}",
        "attention=mha", "ffn=dense", "topology=encoder_only", override("model.name", "hf:bert"),
        override("model.n_kv_heads", hf["num_attention_heads"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "model.attention_bias=true", "model.mlp_bias=true", *numbers(hf, NUMBERS),
    ]


def _mismatch(spec: Any) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` BERT cannot hold, as (key, value, why), or None."""
    m, p = spec.model, spec.params
    wanted = {"topology": "encoder_only", "position": "learned", "norm": "layernorm", "attention": "gqa",
              "ffn": "dense"}
    problem = wrong_plugin_or_topology(spec, "BERT", wanted, TOPOLOGY)
    if problem:
        return problem
    attention, act = p["attention"], p["activation"]
    checks = [
        ("model.layer_pattern", list(m.layer_pattern), not spec.layer_params, "BERT has the same layer throughout"),
        ("activation", act.name, (act.plugin, getattr(act, "approximate", None)) in ACTIVATIONS_BACK,
         f"BERT has one of {sorted(set(ACTIVATIONS_BACK.values()))}"),
        ("position.offset", p["position"].offset, p["position"].offset == 0,
         "BERT has no offset (RoBERTa's offset positions are another model type)"),
        ("norm.bias", p["norm"].bias, p["norm"].bias, "BERT's LayerNorms have a bias"),
        ("attention.num_kv_heads", attention.num_kv_heads, attention.num_kv_heads == m.n_heads,
         "BERT has multi-head attention"),
        ("attention.qkv_bias", attention.qkv_bias, attention.qkv_bias and attention.out_bias,
         "BERT biases every projection"),
        ("attention.window", attention.window, attention.window is None, "BERT attends to every token"),
        ("attention.qk_norm", attention.qk_norm, not attention.qk_norm, "BERT has no QK-norm"),
        ("attention.scale", attention.scale, attention.scale is None, "BERT scales by 1/sqrt(head_dim)"),
        ("model.head_dim", m.head_dim, m.head_dim * m.n_heads == m.d_model, "BERT has head_dim = d_model / n_heads"),
        ("ffn.bias", p["ffn"].bias, p["ffn"].bias, "BERT biases the FFN"),
        ("model.type_vocab_size", m.type_vocab_size, m.type_vocab_size >= 1, "BERT has token-type embeddings"),
        ("model.embedding_dim", m.embedding_dim, m.embedding_width == m.d_model,
         "BERT has no factorized embeddings (ALBERT is another model type)"),
    ]
    return first_failed(checks)


def hf_config(spec: Any) -> dict[str, Any]:
    ensure_fits(_mismatch(spec), "bert")
    m, act = spec.model, spec.params["activation"]
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "intermediate_size": m.ffn_dim, "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len,
        "type_vocab_size": m.type_vocab_size, "layer_norm_eps": m.norm_eps,
        "hidden_act": ACTIVATIONS_BACK[act.plugin, getattr(act, "approximate", None)],
        "tie_word_embeddings": m.tie_embeddings, "is_decoder": False, "add_cross_attention": False,
    }


def _pair(ours: str, theirs: str) -> list[TensorRule]:
    """A Linear or LayerNorm: weight and bias."""
    return [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]


def tensors(spec: Any) -> list[TensorRule]:
    d = spec.model.d_model
    rules = [
        TensorRule("embed.tokens.weight", ("bert.embeddings.word_embeddings.weight",)),
        TensorRule("position.table.weight", ("bert.embeddings.position_embeddings.weight",)),
        TensorRule("embed.token_types.weight", ("bert.embeddings.token_type_embeddings.weight",)),
        *_pair("embed.norm", "bert.embeddings.LayerNorm"),
        *_pair(BLOCK + "attn.out", LAYER + "attention.output.dense"),
        *_pair(BLOCK + "attn_norm", LAYER + "attention.output.LayerNorm"),
        *_pair(BLOCK + "ffn.up", LAYER + "intermediate.dense"),
        *_pair(BLOCK + "ffn.down", LAYER + "output.dense"),
        *_pair(BLOCK + "ffn_norm", LAYER + "output.LayerNorm"),
        *_pair("head.transform.0", "cls.predictions.transform.dense"),
        *_pair("head.transform.2", "cls.predictions.transform.LayerNorm"),
    ]
    for kind in ("weight", "bias"):
        rules.append(TensorRule(BLOCK + f"attn.qkv.{kind}",
                                tuple(LAYER + f"attention.self.{p}.{kind}" for p in ("query", "key", "value")),
                                "cat", (d, d, d)))
    if spec.model.tie_embeddings:
        rules.append(TensorRule("head.bias", ("cls.predictions.bias",)))
    else:
        # Untied, transformers 5 unties the decoder's bias too: its forward adds
        # cls.predictions.decoder.bias and never reads cls.predictions.bias.
        rules += [TensorRule("head.weight", ("cls.predictions.decoder.weight",)),
                  TensorRule("head.bias", ("cls.predictions.decoder.bias",))]
    if getattr(spec.params["topology"], "pooler", False):
        rules += _pair("pooler", "bert.pooler.dense")
    return rules


# Tied, the decoder's weight and bias are the word embeddings and cls.predictions.bias
# (older checkpoints store the copies); untied, cls.predictions.bias is a parameter
# transformers 5 keeps but never uses; `position_ids` is a buffer transformers < 4.31
# saved; the pooler and next-sentence head belong to BertModel / BertForPreTraining.
IGNORE = ("embeddings.position_ids", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
          "cls.predictions.bias", "bert.pooler.dense.", "cls.seq_relationship.")

# Google's original BERT checkpoints name LayerNorm tensors gamma and beta.
RENAMES = (("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias"))
TYPES = (ModelType("bert", "BertForMaskedLM", bert_overrides, hf_config, tensors, IGNORE, renames=RENAMES),)


def guess(spec: Any) -> str | None:
    return "bert" if _mismatch(spec) is None else None
