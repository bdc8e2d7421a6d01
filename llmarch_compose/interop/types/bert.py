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

from typing import Any, Mapping

from ..fit import ANY, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, SPLIT_HEADS, activation, activation_back, dense,
                     family_guess, numbers, refuse, topology)

# BertConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "tie_word_embeddings": True, "is_decoder": False, "add_cross_attention": False,
            "pad_token_id": 0, "bos_token_id": None,
            "eos_token_id": None}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "type_vocab_size": "model.type_vocab_size",
    "layer_norm_eps": "model.norm_eps",
}
LAYER = "bert.encoder.layer.{i}."
BLOCK = "encoder.blocks.{i}."
def bert_overrides(hf: Mapping[str, Any]) -> list[str]:
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


# encoder_only's own layout (post-norm, embedding norm, the MLM transform and its bias),
# LayerNorms with biases, absolute positions from row 0, token types, multi-head attention.
EXPRESSES = Expresses(
    groups={"position": {"learned": {"max_positions": ANY, "offset": only(0, why="positions offset by some rows "
                                                                                 "(RoBERTa is another model type)")}},
            "norm": LAYERNORM, "activation": PLAIN, "attention": MHA_BIASED, "ffn": dense(bias=only(True)),
            "topology": {"encoder_only": topology(norm_position=only("post"), embedding_norm=only(True),
                                                  mlm_transform=only(True), head_bias=only("param"), pooler=ANY)}},
    model={"head_dim": SPLIT_HEADS, "tie_embeddings": ANY,
           "embedding_dim": only(None, why="factorized embeddings (ALBERT is another model type)"),
           "type_vocab_size": where(lambda v, spec: v >= 1, "an integer >= 1", "a BERT without token types")},
    stacks=("encoder",))


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "intermediate_size": spec.params["ffn"].hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": spec.params["position"].max_positions, "type_vocab_size": m.type_vocab_size,
        "layer_norm_eps": spec.params["norm"].eps, "hidden_act": activation_back(spec, PLAIN_BACK),
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
TYPES = (ModelType("bert", "BertForMaskedLM", bert_overrides, hf_config, tensors, IGNORE, renames=RENAMES,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
