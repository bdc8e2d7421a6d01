"""The GPT-2 family: gpt2 (GPT2LMHeadModel) and gpt_bigcode (GPTBigCodeForCausalLM,
SantaCoder / StarCoder 1): pre-norm LayerNorm blocks with biases, learned positions,
a plain MLP, a head tied unless the config says otherwise.

The checkpoint layout: `transformer.wte` / `transformer.wpe`, `transformer.h.{i}.ln_1`,
`attn.c_attn` (q|k|v already fused), `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`,
`transformer.ln_f`, and `lm_head` only when untied.

- gpt2: multi-head attention; the projections are Conv1D, stored [in, out]: each
  weight is transposed (`t`), the biases copied.
- gpt_bigcode: nn.Linear projections (copied); `multi_query` attention (one key/value
  head: c_attn is q | k | v, as ours), or else multi-head attention whose c_attn
  rows run head by head (our `heads` join).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..fit import ANY, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, PLAIN_MODEL, SPLIT_HEADS, TOPOLOGY, activation,
                     activation_back, dense, family_guess, numbers, refuse, unused)

# The config classes' defaults (GPT2Config(), GPTBigCodeConfig()), for config.json files that leave a field out.
_BASE = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
         "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "tie_word_embeddings": True,
         "add_cross_attention": False, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None}
DEFAULTS = {
    "gpt2": {**_BASE, "activation_function": "gelu_new", "scale_attn_by_inverse_layer_idx": False,
             "reorder_and_upcast_attn": False, "summary_type": "cls_index", "summary_use_proj": True,
             "summary_activation": None, "summary_proj_to_labels": True},
    "gpt_bigcode": {**_BASE, "activation_function": "gelu_pytorch_tanh", "attention_softmax_in_fp32": True,
                    "scale_attention_softmax_in_fp32": True, "multi_query": True},
}
NUMBERS = {
    "n_embd": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
    "vocab_size": "model.vocab_size", "n_positions": "model.max_seq_len", "layer_norm_epsilon": "model.norm_eps",
}
LAYER = "transformer.h.{i}."
BLOCK = "decoder.blocks.{i}."


def _overrides(hf: Mapping[str, Any], name: str, kv_heads: int) -> list[str]:
    refuse(hf, "add_cross_attention", "cross-attention blocks in a decoder-only model")
    out = [
        "position=learned", "norm=layernorm", f"activation={activation(hf, 'activation_function', gated=False)}",
        "attention=mha" if kv_heads == hf["n_head"] else "attention=mqa", "ffn=dense", "topology=decoder_only",
        override("model.name", f"hf:{name}"), override("model.n_kv_heads", kv_heads),
        override("model.ffn_dim", hf["n_inner"] or 4 * hf["n_embd"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "model.attention_bias=true", "model.mlp_bias=true", *numbers(hf, NUMBERS),
    ]
    if not hf["scale_attn_weights"]:  # raw q.k scores
        out.append(override("model.attention_scale", 1.0))
    return out


def gpt2_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "scale_attn_by_inverse_layer_idx", "attention scores divided by the layer index + 1 per layer")
    refuse(hf, "reorder_and_upcast_attn", "attention scores upcast to fp32 in a reordered product")
    # The sequence-summary head of GPT2DoubleHeadsModel: not part of the language model.
    unused(hf, "summary_type", "summary_use_proj", "summary_activation", "summary_proj_to_labels")
    return _overrides(hf, "gpt2", hf["n_head"])


def gpt_bigcode_overrides(hf: Mapping[str, Any]) -> list[str]:
    # Where the softmax runs (fp32 or the weights' dtype): the same function, at another precision.
    unused(hf, "attention_softmax_in_fp32", "scale_attention_softmax_in_fp32")
    kv_heads = 1 if hf["multi_query"] else hf["n_head"]
    # Saved configs also state the count multi_query implies (the modeling code reads multi_query).
    if hf.get("num_key_value_heads") not in (None, kv_heads):
        raise ConfigError("num_key_value_heads", hf["num_key_value_heads"], f"cannot be represented: "
                          f"multi_query={hf['multi_query']} gives {kv_heads} key/value heads", [None, kv_heads])
    return _overrides(hf, "gpt_bigcode", kv_heads)


def _expresses(num_kv_heads: Any) -> Expresses:
    # Pre-norm LayerNorm blocks with biases everywhere, absolute positions from row 0, attention
    # scaled by 1/sqrt(head_dim) or not at all (scale_attn_weights).
    return Expresses(
        groups={"position": {"learned": {"max_positions": ANY, "offset": only(0)}}, "norm": LAYERNORM,
                "activation": PLAIN, "attention": {"gqa": {**MHA_BIASED["gqa"], "num_kv_heads": num_kv_heads,
                                                           "scale": only(None, 1.0)}},
                "ffn": dense(bias=only(True)), "topology": {"decoder_only": TOPOLOGY}},
        model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


EXPRESSES = {
    "gpt2": _expresses(MHA_BIASED["gqa"]["num_kv_heads"]),
    # multi_query: one key/value head; otherwise as many as query heads.
    "gpt_bigcode": _expresses(where(lambda v, spec: v in (1, spec.model.n_heads), "1 or model.n_heads",
                                    "grouped key/value heads other than one (multi_query) or all")),
}


def _hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    return {
        "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "n_positions": spec.params["position"].max_positions,
        "layer_norm_epsilon": spec.params["norm"].eps, "tie_word_embeddings": m.tie_embeddings,
        "scale_attn_weights": spec.params["attention"].scale is None, "add_cross_attention": False,
    }


def gpt2_config(spec: Any) -> dict[str, Any]:
    return {**_hf_config(spec), "activation_function": activation_back(spec, PLAIN_BACK),
            "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}


def gpt_bigcode_config(spec: Any) -> dict[str, Any]:
    back = {**PLAIN_BACK, ("gelu", "tanh"): "gelu_pytorch_tanh"}  # its own spelling of tanh GELU
    return {**_hf_config(spec), "activation_function": activation_back(spec, back),
            "multi_query": spec.params["attention"].num_kv_heads == 1 < spec.model.n_heads}


def _tensors(spec: Any, weight: str, qkv: Optional[tuple[str, tuple[int, ...]]] = None) -> list[TensorRule]:
    """The shared table; `weight`: how a projection's weight is stored (`t` for Conv1D); `qkv`:
    (join, sizes) when c_attn's rows are not already our q | k | v."""
    qkv_weight, qkv_bias = (qkv, qkv) if qkv else ((weight, ()), ("copy", ()))
    rules = [
        TensorRule("embed.tokens.weight", ("transformer.wte.weight",)),
        TensorRule("position.table.weight", ("transformer.wpe.weight",)),
        TensorRule(BLOCK + "attn.qkv.weight", (LAYER + "attn.c_attn.weight",), *qkv_weight),
        TensorRule(BLOCK + "attn.qkv.bias", (LAYER + "attn.c_attn.bias",), *qkv_bias),
        TensorRule(BLOCK + "attn.out.weight", (LAYER + "attn.c_proj.weight",), weight),
        TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.c_fc.weight",), weight),
        TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.c_proj.weight",), weight),
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


def gpt2_tensors(spec: Any) -> list[TensorRule]:
    return _tensors(spec, "t")


def gpt_bigcode_tensors(spec: Any) -> list[TensorRule]:
    heads = spec.params["attention"].num_kv_heads
    return _tensors(spec, "copy", None if heads == 1 < spec.model.n_heads else ("heads", (heads, 3)))


# Checkpoints written before transformers 4.x dropped them store the causal mask
# (`attn.bias`) and its fill value (`attn.masked_bias`) as buffers; a tied
# checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

# openai-community/gpt2 stores GPT2Model's names without the "transformer." prefix.
TYPES = (ModelType("gpt2", "GPT2LMHeadModel", gpt2_overrides, gpt2_config, gpt2_tensors, IGNORE,
                   prefix="transformer.", expresses=EXPRESSES["gpt2"], defaults=DEFAULTS["gpt2"]),
         ModelType("gpt_bigcode", "GPTBigCodeForCausalLM", gpt_bigcode_overrides, gpt_bigcode_config,
                   gpt_bigcode_tensors, IGNORE, prefix="transformer.", expresses=EXPRESSES["gpt_bigcode"],
                   defaults=DEFAULTS["gpt_bigcode"], extra_fields={"num_key_value_heads": None}))

guess = family_guess(TYPES)
