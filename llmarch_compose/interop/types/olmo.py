"""The OLMo family: olmo (OlmoForCausalLM, OLMo-1) and olmo2 (Olmo2ForCausalLM).

Both keep LLaMA's checkpoint layout (`model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `model.embed_tokens`, `lm_head`) and its gated MLP and RoPE.

- OLMo-1 normalizes with a LayerNorm that has neither weight nor bias (eps 1e-5, not a
  config field): our `norm=layernorm` with `norm.affine=false norm.bias=false`; its
  checkpoints hold no norm tensors at all. `clip_qkv` (queries, keys and values clamped
  to +-clip_qkv) is refused.
- OLMo-2 normalizes each sublayer's output before it joins the residual stream
  (`post_attention_layernorm`, `post_feedforward_layernorm`: our
  `topology.norm_position=post_output`, held as `attn_norm` and `ffn_norm`), and its
  QK-norm is an RMSNorm over the whole query and key projections before the heads split
  (`self_attn.q_norm|k_norm`, widths n_heads * head_dim and n_kv_heads * head_dim: our
  `model.qk_norm=true model.qk_norm_scope=whole`).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..fit import Expresses, only
from ..mapping import ModelType, TensorRule, override
from . import llama
from .common import (GATED, PLAIN_MODEL, RMSNORM, SPLIT_HEADS, TOPOLOGY, dense, family_guess, gqa, refuse,
                     rope_position, topology)

_BASE = {"vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
         "max_position_embeddings": 2048, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
         "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_parameters": None, "attention_bias": False}
DEFAULTS = {"olmo": {**_BASE, "clip_qkv": None}, "olmo2": {**_BASE, "rms_norm_eps": 1e-5}}

#: OlmoLayerNorm's epsilon, fixed in its modeling code.
OLMO_EPS = 1e-5
NON_PARAMETRIC = ["norm=layernorm", "norm.affine=false", "norm.bias=false", override("model.norm_eps", OLMO_EPS)]
OLMO2 = ["topology.norm_position=post_output", "model.qk_norm=true", "model.qk_norm_scope=whole"]


def olmo_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "clip_qkv", "OLMo clamps queries, keys and values to +-clip_qkv", allowed=(None,))
    out = [o for o in llama._overrides(hf, "olmo") if o != "norm=rmsnorm"]
    return [*out, *NON_PARAMETRIC]


def olmo2_overrides(hf: Mapping[str, Any]) -> list[str]:
    return [*llama._overrides(hf, "olmo2"), *OLMO2]


def olmo_tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's rules without the norms (OLMo-1's have no parameters)."""
    return [r for r in llama.tensors(spec) if not r.ours.endswith("norm.weight")]


def olmo2_tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's rules (the QK-norms included) with the norms on the sublayers' outputs."""
    layer, block = llama.LAYER, llama.BLOCK
    rules = [r for r in llama.tensors(spec) if r.ours not in (block + "attn_norm.weight", block + "ffn_norm.weight")]
    return [*rules, TensorRule(block + "attn_norm.weight", (layer + "post_attention_layernorm.weight",)),
            TensorRule(block + "ffn_norm.weight", (layer + "post_feedforward_layernorm.weight",))]


def _expresses(norm: Any, attention: Any, topo: Any) -> Expresses:
    # One attention_bias flag for q, k, v and o; no MLP bias, no window; head_dim is hidden / heads.
    return Expresses(groups={"position": rope_position(), "norm": norm, "activation": GATED, "attention": attention,
                             "ffn": dense(), "topology": {"decoder_only": topo}},
                     model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS})


EXPRESSES = {
    "olmo": _expresses({"layernorm": {"eps": only(OLMO_EPS), "bias": only(False), "affine": only(False)}}, gqa(),
                       TOPOLOGY),
    "olmo2": _expresses(RMSNORM, gqa(qk_norm=only(True), qk_norm_scope=only("whole")),
                        topology(norm_position=only("post_output"))),
}


def _type(name: str, architecture: str, overrides: Any, tensors: Any) -> ModelType:
    def config(spec: Any) -> dict[str, Any]:
        # LLaMA's writer, each field this type's config has (the fit check has made sure of the rest).
        return {k: v for k, v in llama.hf_config(spec).items() if k in TYPES_BY_NAME[name].fields}

    return ModelType(name, architecture, overrides, config, tensors, llama.IGNORE, expresses=EXPRESSES[name],
                     defaults=DEFAULTS[name])


TYPES = (_type("olmo", "OlmoForCausalLM", olmo_overrides, olmo_tensors),
         _type("olmo2", "Olmo2ForCausalLM", olmo2_overrides, olmo2_tensors))
TYPES_BY_NAME = {t.name: t for t in TYPES}

guess = family_guess(TYPES)
