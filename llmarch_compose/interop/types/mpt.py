"""MPT (MptForCausalLM; mosaicml/mpt-7b, mpt-30b).

A pre-norm decoder without a single bias: ALiBi (the paper's slopes: MPT's reordered
ones of the next power of two are the same), LayerNorms without bias (`norm.bias=false`), a fused `Wqkv`
(q, then k, then v), a 4 x d_model MLP with the exact GELU, and a tied head.

The checkpoint layout: `transformer.wte`, `transformer.blocks.{i}.norm_1`, `attn.Wqkv`,
`attn.out_proj`, `norm_2`, `ffn.up_proj`, `ffn.down_proj`, `transformer.norm_f`,
`lm_head` when untied.

transformers' MptForCausalLM builds that model whatever some fields say; what it would
compute otherwise is refused by name: `no_bias: false`, an `expansion_ratio` other
than 4, `logit_scale`, an `embedding_fraction` below 1, and in `attn_config`
`clip_qkv`, `qk_ln`, `prefix_lm`, `attn_uses_sequence_id`, `alibi: false`,
multi-query attention and an `alibi_bias_max` other than 8 (MptModel never passes it on). `softmax_scale` is our `model.attention_scale`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fields import GENERIC, GENERIC_DEFAULTS
from ..fit import ANY, Expresses, Rule, only
from ..mapping import ModelType, TensorRule, override
from .common import MHA_BIASED, PLAIN_MODEL, SPLIT_HEADS, dense, family_guess, refuse, topology, unused

# MptConfig()'s defaults (attn_config: None means MptAttentionConfig()'s, ATTENTION below).
DEFAULTS = {"d_model": 2048, "n_heads": 16, "n_layers": 24, "expansion_ratio": 4, "max_seq_len": 2048,
            "vocab_size": 50368, "layer_norm_epsilon": 1e-5, "learned_pos_emb": True, "attn_config": None,
            "init_device": "cpu", "logit_scale": None, "no_bias": True, "embedding_fraction": 1.0,
            "norm_type": "low_precision_layernorm", "tie_word_embeddings": True, "pad_token_id": None,
            "bos_token_id": None, "eos_token_id": None}
ATTENTION = {"attn_type": "multihead_attention", "attn_pdrop": 0, "attn_impl": "torch", "clip_qkv": None,
             "softmax_scale": None, "prefix_lm": False, "qk_ln": False, "attn_uses_sequence_id": False,
             "alibi": True, "alibi_bias_max": 8}
LAYER, BLOCK, BASE = "transformer.blocks.{i}.", "decoder.blocks.{i}.", "transformer."


def _attention(hf: Mapping[str, Any]) -> dict[str, Any]:
    """attn_config with MptAttentionConfig's defaults for what it leaves out; its unknown keys refused."""
    stated = dict(hf.get("attn_config") or {})
    # transformers writes the sub-config with every config's bookkeeping fields.
    unknown = sorted(set(stated) - set(ATTENTION) - GENERIC - set(GENERIC_DEFAULTS))
    if unknown:
        raise ConfigError(f"attn_config.{unknown[0]}", stated[unknown[0]], "not a field of MPT's attention config",
                          sorted(ATTENTION))
    return {**ATTENTION, **stated}


def overrides(hf: Mapping[str, Any]) -> list[str]:
    attn = _attention(hf)
    for field, why, allowed in (
            ("clip_qkv", "queries, keys and values clamped", (None, 0)),
            ("qk_ln", "LayerNorms of queries and keys", (False,)),
            ("prefix_lm", "a bidirectional prefix", (False,)),
            ("attn_uses_sequence_id", "attention limited to each packed sequence", (False,)),
            ("alibi", "MptForCausalLM always biases by ALiBi", (True,)),
            ("attn_type", "MptForCausalLM always builds multi-head attention", ("multihead_attention",)),
            # MptModel builds its ALiBi with the default maximum whatever the config says.
            ("alibi_bias_max", "ALiBi slopes down to another 2^-max than MptForCausalLM's 2^-8", (8, 8.0))):
        if attn[field] not in allowed:
            raise ConfigError(f"attn_config.{field}", attn[field], f"cannot be represented: {why}",
                              [repr(a) for a in allowed])
    refuse(hf, "no_bias", "biases (MptForCausalLM builds none whatever no_bias says)", allowed=(True,))
    refuse(hf, "expansion_ratio", "an MLP other than 4 x d_model wide (MptMLP is 4 x)", allowed=(4,))
    refuse(hf, "logit_scale", "logits scaled before the softmax", allowed=(None,))
    refuse(hf, "embedding_fraction", "a share of the embeddings' gradient", allowed=(1, 1.0))
    # Which LayerNorm kernel, where to build the weights, and a learned position table that
    # MptForCausalLM never builds (ALiBi only); the kernel and the dropout of attn_config.
    unused(hf, "norm_type", "init_device", "learned_pos_emb")
    width = hf["d_model"]
    scale = attn["softmax_scale"]
    return [
        "position=alibi", "norm=layernorm", "norm.bias=false", "activation=gelu", "attention=mha", "ffn=dense",
        "topology=decoder_only", override("model.name", "hf:mpt"), override("model.d_model", width),
        override("model.n_layers", hf["n_layers"]), override("model.n_heads", hf["n_heads"]),
        override("model.n_kv_heads", hf["n_heads"]), override("model.ffn_dim", 4 * width),
        override("model.vocab_size", hf["vocab_size"]), override("model.max_seq_len", hf["max_seq_len"]),
        override("model.norm_eps", hf["layer_norm_epsilon"]),
        override("model.attention_scale", None if scale is None else float(scale)),
        "model.head_dim=null", "model.attention_bias=false", "model.qkv_bias=false", "model.mlp_bias=false",
        "model.qk_norm=false", override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
    ]


# Pre-norm bias-free LayerNorms, ALiBi of any maximum, no biases, a 4 x d_model MLP with the exact GELU.
EXPRESSES = Expresses(
    groups={"position": {"alibi": {}}, "norm": {"layernorm": {"eps": ANY, "bias": only(False)}},
            "activation": {"gelu": {"approximate": only("none")}},
            "attention": {"gqa": {**MHA_BIASED["gqa"], "qkv_bias": only(False), "out_bias": only(False),
                                  "scale": ANY}},
            "ffn": dense(), "topology": {"decoder_only": topology()}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS},
    rules=(Rule("ffn.hidden", lambda spec: spec.params["ffn"].hidden,
                lambda spec: spec.params["ffn"].hidden == 4 * spec.model.d_model, "4 x model.d_model",
                "an MLP other than 4 x d_model wide"),))


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    attn = {**ATTENTION, "softmax_scale": spec.params["attention"].scale}
    return {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "expansion_ratio": 4,
            "max_seq_len": m.max_seq_len, "vocab_size": m.vocab_size, "layer_norm_epsilon": spec.params["norm"].eps,
            "no_bias": True, "tie_word_embeddings": m.tie_embeddings, "attn_config": attn}


def tensors(spec: Any) -> list[TensorRule]:
    rules = [TensorRule("embed.tokens.weight", (BASE + "wte.weight",)),
             TensorRule(BLOCK + "attn.qkv.weight", (LAYER + "attn.Wqkv.weight",), "copy"),
             TensorRule(BLOCK + "attn.out.weight", (LAYER + "attn.out_proj.weight",)),
             TensorRule(BLOCK + "attn_norm.weight", (LAYER + "norm_1.weight",)),
             TensorRule(BLOCK + "ffn_norm.weight", (LAYER + "norm_2.weight",)),
             TensorRule(BLOCK + "ffn.up.weight", (LAYER + "ffn.up_proj.weight",)),
             TensorRule(BLOCK + "ffn.down.weight", (LAYER + "ffn.down_proj.weight",)),
             TensorRule("decoder.final_norm.weight", (BASE + "norm_f.weight",))]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store the head (a copy of the embeddings).
IGNORE = ("lm_head.weight",)

TYPES = (ModelType("mpt", "MptForCausalLM", overrides, hf_config, tensors, IGNORE, expresses=EXPRESSES,
                   defaults=DEFAULTS),)

guess = family_guess(TYPES)
