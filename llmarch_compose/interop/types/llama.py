"""The LLaMA family: llama, mistral, qwen2 (dense) and mixtral (experts).

Their checkpoints share one layout: `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj` (Mixtral: `block_sparse_moe.gate` and
`experts.{e}.w1|w3|w2`), RMSNorm weights, `model.norm`, `lm_head`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..hf import ModelType, TensorRule, override
from .common import activation, numbers, refuse, rope, rope_back

NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "rms_norm_eps": "model.norm_eps",
    "attention_bias": "model.attention_bias",
    "mlp_bias": "model.mlp_bias", "head_dim": "model.head_dim",
}
LAYER = "model.layers.{i}."
BLOCK = "decoder.blocks.{i}."


def _overrides(hf: Mapping[str, Any], name: str, window_key: str = "sliding_window") -> list[str]:
    refuse(hf, "pretraining_tp", "tensor-parallel slicing of the projections", allowed=(None, 1))
    out = [
        "position=rope", "norm=rmsnorm", f"activation={activation(hf, 'hidden_act', gated=True)}",
        "topology=decoder_only", "ffn=dense", override("model.name", f"hf:{name}"),
        override("model.n_kv_heads", hf.get("num_key_value_heads") or hf["num_attention_heads"]),
        override("model.tie_embeddings", bool(hf.get("tie_word_embeddings", False))),
        *numbers(hf, NUMBERS), *rope(hf),
    ]
    window = hf.get(window_key)
    out += ["attention=swa", override("model.window", window)] if window else ["attention=gqa"]
    return out


def llama_overrides(hf: Mapping[str, Any]) -> list[str]:
    return _overrides(hf, hf.get("model_type", "llama"))


def qwen2_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "use_sliding_window", "Qwen-2 windows only the layers past max_window_layers")
    return [*_overrides(hf, "qwen2", window_key="_never"), "model.qkv_bias=true", "model.attention_bias=false"]


def mixtral_overrides(hf: Mapping[str, Any]) -> list[str]:
    out = [o for o in _overrides(hf, "mixtral") if not o.startswith("ffn=")]
    return [*out, "ffn=moe", override("model.n_experts", hf["num_local_experts"]),
            override("model.experts_per_token", hf["num_experts_per_tok"]),
            override("model.router_aux_loss_coef", hf.get("router_aux_loss_coef", 0.02))]


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention = spec.model, spec.params["attention"]
    out = {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.ffn_dim,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": attention.out_bias,
        "mlp_bias": m.mlp_bias, "sliding_window": attention.window, **rope_back(spec),
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
    ffn = spec.params["ffn"]
    if ffn.plugin == "moe":
        experts = LAYER + "block_sparse_moe.experts.{e}."
        rules += [TensorRule(BLOCK + "ffn.router.weight", (LAYER + "block_sparse_moe.gate.weight",)),
                  TensorRule(BLOCK + "ffn.w_in", (experts + "w1.weight", experts + "w3.weight"), "experts",
                             (ffn.hidden, ffn.hidden)),
                  TensorRule(BLOCK + "ffn.w_out", (experts + "w2.weight",), "experts")]
    else:
        for kind in ("weight", "bias") if m.mlp_bias else ("weight",):
            rules += [TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.gate_proj.{kind}", LAYER + f"mlp.up_proj.{kind}"),
                                 "cat", (ffn.hidden, ffn.hidden)),
                      TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.down_proj.{kind}",))]
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = ("rotary_emb.inv_freq", "lm_head.weight")

TYPES = (
    ModelType("llama", "LlamaForCausalLM", llama_overrides, hf_config, tensors, IGNORE),
    ModelType("mistral", "MistralForCausalLM", llama_overrides, hf_config, tensors, IGNORE),
    ModelType("qwen2", "Qwen2ForCausalLM", qwen2_overrides, hf_config, tensors, IGNORE),
    ModelType("mixtral", "MixtralForCausalLM", mixtral_overrides, hf_config, tensors, IGNORE),
)


def guess(spec: Any) -> str | None:
    p = {g: spec.params[g].plugin for g in spec.params}
    if (p["topology"], p["position"], p["norm"], p["attention"]) != ("decoder_only", "rope", "rmsnorm", "gqa"):
        return None
    m, attention, ffn = spec.model, spec.params["attention"], spec.params["ffn"]
    if (spec.params["activation"].plugin != "swiglu" or spec.layer_params or m.rotary_fraction != 1.0
            or m.rope_interleaved or attention.qk_norm or attention.scale is not None):
        return None
    if ffn.plugin == "moe":
        plain_routing = (ffn.router, ffn.shared_experts, ffn.normalize_top_k, ffn.n_groups, ffn.routed_scaling,
                         ffn.bias_update_rate, ffn.capacity, ffn.capacity_factor) == (
                             "softmax", 0, True, ffn.topk_groups, 1.0, 0.0, None, None)
        return "mixtral" if plain_routing else None
    if attention.qkv_bias and not attention.out_bias:
        return "qwen2"
    return "mistral" if attention.window else "llama"
