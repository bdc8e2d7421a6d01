"""The LLaMA family: llama, mistral, qwen2, qwen3 (dense) and mixtral (experts).

Their checkpoints share one layout: `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj` (Mixtral: `block_sparse_moe.gate` and
`experts.{e}.w1|w3|w2`), RMSNorm weights, `model.norm`, `lm_head`; qwen3 adds per-head RMSNorms of queries and
keys (`self_attn.q_norm|k_norm`, our `model.qk_norm`) and states head_dim apart from
hidden_size / num_attention_heads.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only
from ..mapping import ModelType, TensorRule, override
from .common import (GATED, GATED_BACK, PLAIN_MODEL, RMSNORM, TOPOLOGY, activation, activation_back, dense,
                     family_guess, gqa, moe, numbers, refuse, rope, rope_back, rope_position, unused)

# The transformers config classes' defaults (LlamaConfig() etc.), for fields a config.json leaves out.
_BASE = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "head_dim": None,
         "rope_theta": 10000.0, "rope_parameters": None, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": None}
DEFAULTS = {
    "llama": {**_BASE, "intermediate_size": 11008, "num_key_value_heads": None, "max_position_embeddings": 2048,
              "pretraining_tp": 1, "attention_bias": False, "mlp_bias": False},
    "mistral": {**_BASE, "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "qwen2": {**_BASE, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
              "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 28, "layer_types": None, "bos_token_id": None,
              "eos_token_id": None},
    "qwen3": {**_BASE, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32, "head_dim": 128,
              "max_position_embeddings": 32768, "attention_bias": False, "use_sliding_window": False,
              "sliding_window": 4096, "max_window_layers": 28, "layer_types": None, "bos_token_id": None,
              "eos_token_id": None},
    "mixtral": {**_BASE, "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5, "sliding_window": None, "num_experts_per_tok": 2, "num_local_experts": 8,
                "router_aux_loss_coef": 0.001, "rope_theta": 1e6},
}

NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "rms_norm_eps": "model.norm_eps",
    "attention_bias": "model.attention_bias",
    "mlp_bias": "model.mlp_bias", "head_dim": "model.head_dim",
}
LAYER = "model.layers.{i}."
BLOCK = "decoder.blocks.{i}."


def _overrides(hf: Mapping[str, Any], name: str, window_key: str = "_never", act_key: str = "hidden_act"
               ) -> list[str]:
    refuse(hf, "pretraining_tp", "tensor-parallel slicing of the projections", allowed=(None, 1))
    out = [
        "position=rope", "norm=rmsnorm", f"activation={activation(hf, act_key, gated=True)}",
        "topology=decoder_only", "ffn=dense", override("model.name", f"hf:{name}"),
        override("model.n_kv_heads", hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        override("model.tie_embeddings", bool(hf.get("tie_word_embeddings", False))),
        *numbers(hf, NUMBERS), *rope(hf),
    ]
    window = hf.get(window_key)
    out += ["attention=swa", override("model.window", window)] if window else ["attention=gqa"]
    return out


def llama_overrides(hf: Mapping[str, Any]) -> list[str]:
    return _overrides(hf, "llama")  # LlamaForCausalLM has no window, whatever sliding_window says


def mistral_overrides(hf: Mapping[str, Any]) -> list[str]:
    return _overrides(hf, "mistral", window_key="sliding_window")


def full_attention_layers(hf: Mapping[str, Any]) -> None:
    """Qwen's configs window only some layers (`use_sliding_window` with `max_window_layers`, or
    transformers 5's `layer_types`): refused; with every layer full, the window sizes are moot."""
    refuse(hf, "use_sliding_window", "Qwen windows only the layers past max_window_layers")
    sliding = [i for i, t in enumerate(hf.get("layer_types") or []) if t != "full_attention"]
    if sliding:
        raise ConfigError("layer_types", hf["layer_types"], f"cannot be represented: layers {sliding} are "
                          "not full attention", ["full_attention in every layer"])
    unused(hf, "sliding_window", "max_window_layers")


def qwen2_overrides(hf: Mapping[str, Any]) -> list[str]:
    full_attention_layers(hf)
    return [*_overrides(hf, "qwen2", window_key="_never"), "model.qkv_bias=true", "model.attention_bias=false"]


def qwen3_overrides(hf: Mapping[str, Any]) -> list[str]:
    full_attention_layers(hf)
    return [*_overrides(hf, "qwen3", window_key="_never"), "model.qk_norm=true"]


def mixtral_overrides(hf: Mapping[str, Any]) -> list[str]:
    out = [o for o in _overrides(hf, "mixtral", window_key="sliding_window") if not o.startswith("ffn=")]
    return [*out, "ffn=moe", override("model.n_experts", hf["num_local_experts"]),
            override("model.experts_per_token", hf["num_experts_per_tok"]),
            override("model.router_aux_loss_coef", hf["router_aux_loss_coef"])]


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    out = {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim,
        "intermediate_size": spec.params["ffn"].hidden,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, GATED_BACK),
        "attention_bias": attention.out_bias,
        "mlp_bias": getattr(spec.params["ffn"], "bias", False), "sliding_window": attention.window, **rope_back(spec),
    }
    if spec.params["ffn"].plugin == "moe":
        ffn = spec.params["ffn"]
        out.update(num_local_experts=ffn.num_experts, num_experts_per_tok=ffn.top_k,
                   router_aux_loss_coef=ffn.aux_loss_coef, intermediate_size=ffn.hidden)
    return out


def tensors(spec: Any) -> list[TensorRule]:
    m, attention = spec.model, spec.params["attention"]
    q, kv = m.n_heads * m.head_dim, attention.num_kv_heads * m.head_dim
    rules = [
        TensorRule("embed.tokens.weight", ("model.embed_tokens.weight",)),
        TensorRule(BLOCK + "attn_norm.weight", (LAYER + "input_layernorm.weight",)),
        TensorRule(BLOCK + "ffn_norm.weight", (LAYER + "post_attention_layernorm.weight",)),
        TensorRule(BLOCK + "attn.out.weight", (LAYER + "self_attn.o_proj.weight",)),
        TensorRule("decoder.final_norm.weight", ("model.norm.weight",)),
    ]
    for kind in ("weight", "bias") if attention.qkv_bias else ("weight",):
        rules.append(TensorRule(BLOCK + f"attn.qkv.{kind}", tuple(LAYER + f"self_attn.{p}_proj.{kind}" for p in "qkv"),
                                "cat", (q, kv, kv)))
    if attention.out_bias:
        rules.append(TensorRule(BLOCK + "attn.out.bias", (LAYER + "self_attn.o_proj.bias",)))
    if attention.qk_norm:  # Qwen-3's per-head RMSNorms of queries and keys
        rules += [TensorRule(BLOCK + f"attn.{n}.weight", (LAYER + f"self_attn.{n}.weight",))
                  for n in ("q_norm", "k_norm")]
    ffn = spec.params["ffn"]
    if ffn.plugin == "moe":
        experts = LAYER + "block_sparse_moe.experts.{e}."
        rules += [TensorRule(BLOCK + "ffn.router.weight", (LAYER + "block_sparse_moe.gate.weight",)),
                  TensorRule(BLOCK + "ffn.w_in", (experts + "w1.weight", experts + "w3.weight"), "experts",
                             (ffn.hidden, ffn.hidden)),
                  TensorRule(BLOCK + "ffn.w_out", (experts + "w2.weight",), "experts")]
    else:
        for kind in ("weight", "bias") if ffn.bias else ("weight",):
            rules += [TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.gate_proj.{kind}", LAYER + f"mlp.up_proj.{kind}"),
                                 "cat", (ffn.hidden, ffn.hidden)),
                      TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.down_proj.{kind}",))]
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = ("rotary_emb.inv_freq", "lm_head.weight")


def _expresses(attention: Any, ffn: Any) -> Expresses:
    groups = {"position": rope_position(), "norm": RMSNORM, "activation": GATED, "attention": attention,
              "ffn": ffn, "topology": {"decoder_only": TOPOLOGY}}
    return Expresses(groups=groups, model=PLAIN_MODEL)


NO_BIAS = dict(qkv_bias=only(False), out_bias=only(False))
EXPRESSES = {
    # One attention_bias flag for q, k, v and o; mlp_bias; no window.
    "llama": _expresses(gqa(), dense(bias=ANY)),
    "mistral": _expresses(gqa(**NO_BIAS, window=ANY), dense()),
    # Biases on q, k and v, never on o; a window only on some layers (refused on reading).
    "qwen2": _expresses(gqa(qkv_bias=only(True), out_bias=only(False)), dense()),
    # QK-norm always; attention_bias on all four projections; a window only on some layers (refused).
    "qwen3": _expresses(gqa(qk_norm=only(True)), dense()),
    "mixtral": _expresses(gqa(**NO_BIAS, window=ANY), moe()),
}


def _type(name: str, architecture: str, overrides: Any) -> ModelType:
    def config(spec: Any) -> dict[str, Any]:
        # One writer for four config classes: each gets the fields it has (the fit check has made sure
        # the others hold what their absence means: no window for llama, no biases for mistral).
        kind = TYPES_BY_NAME[name]
        return {k: v for k, v in hf_config(spec).items() if k in kind.fields}

    return ModelType(name, architecture, overrides, config, tensors, IGNORE, expresses=EXPRESSES[name],
                     defaults=DEFAULTS[name])


TYPES = (
    _type("llama", "LlamaForCausalLM", llama_overrides),
    _type("mistral", "MistralForCausalLM", mistral_overrides),
    _type("qwen2", "Qwen2ForCausalLM", qwen2_overrides),
    _type("qwen3", "Qwen3ForCausalLM", qwen3_overrides),
    _type("mixtral", "MixtralForCausalLM", mixtral_overrides),
)
TYPES_BY_NAME = {t.name: t for t in TYPES}

guess = family_guess(TYPES)
