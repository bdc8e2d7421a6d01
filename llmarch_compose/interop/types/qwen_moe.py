"""The Qwen mixture-of-experts family: qwen2_moe (Qwen1.5-MoE, Qwen2-MoE) and qwen3_moe.

Both are LLaMA-shaped decoders whose MLP is, in most layers, a softmax top-k
router `mlp.gate` over experts stored one by one on disk
(`mlp.experts.{e}.gate_proj|up_proj|down_proj`; transformers fuses them in
memory only). The layers listed in `mlp_only_layers`, and those a
`decoder_sparse_step` skips, keep a dense MLP of `intermediate_size`: that is
our `model.layer_pattern` rule `{layers: [...], ffn: dense}`.

- qwen2_moe: one always-on shared expert (`shared_expert_intermediate_size`
  wide, a whole number of our `expert_ffn_dim` experts) scaled by
  sigmoid(`shared_expert_gate`): our ffn=qwen_moe; biases on q, k, v (`qkv_bias`).
- qwen3_moe: no shared expert; per-head RMSNorm of queries and keys
  (`model.qk_norm`); `attention_bias` on all four projections.

`norm_topk_prob` is our `ffn.normalize_top_k` for both.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ModelType, TensorRule, override
from . import llama
from .common import (GATED, GATED_BACK, PLAIN_MODEL, RMSNORM, TOPOLOGY, activation_back, dense, family_guess, gqa,
                     moe, refuse, rope_back, rope_position)

# Qwen2MoeConfig() and Qwen3MoeConfig()'s defaults, for fields a config.json leaves out.
_BASE = {"vocab_size": 151936, "hidden_size": 2048, "num_hidden_layers": 24, "hidden_act": "silu",
         "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
         "rope_parameters": None, "use_sliding_window": False, "sliding_window": 4096, "decoder_sparse_step": 1, "norm_topk_prob": False,
         "router_aux_loss_coef": 0.001, "mlp_only_layers": [], "bos_token_id": None,
         "eos_token_id": None, "pad_token_id": None}
DEFAULTS = {
    "qwen2_moe": {**_BASE, "intermediate_size": 5632, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
                  "num_experts_per_tok": 4, "num_experts": 60, "qkv_bias": True, "max_window_layers": 28,
                  "layer_types": None},
    "qwen3_moe": {**_BASE, "intermediate_size": 6144, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "attention_bias": False, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
                  "num_experts": 128},
}

LAYER, BLOCK = llama.LAYER, llama.BLOCK


# ------------------------------------------------------------------ helpers the MoE families share

def dense_layers(spec: Any) -> dict[int, Any]:
    """The decoder layers a layer_pattern gives a dense FFN: {layer: its ffn params}."""
    return {layer: changes["ffn"] for (stack, layer), changes in spec.layer_params.items()
            if stack == "decoder" and "ffn" in changes and changes["ffn"].plugin == "dense"}


def dense_width(spec: Any) -> Optional[int]:
    """The one hidden width of the dense layers (the checkpoint's intermediate_size), or None."""
    widths = {p.hidden for p in dense_layers(spec).values()}
    return None if len(widths) > 1 else widths.pop() if widths else spec.model.ffn_dim


#: The dense layers share one intermediate_size.
ONE_DENSE_WIDTH = Rule("model.layer_pattern", lambda spec: list(spec.model.layer_pattern),
                       lambda spec: dense_width(spec) is not None, "dense layers of one width",
                       "dense layers of different widths: the checkpoint has one intermediate_size")


def mlp_rules(layer: int, hidden: int, mlp: str = "mlp.") -> list[TensorRule]:
    """A gated MLP stored as gate_proj, up_proj, down_proj, as our fused `up` and `down`."""
    ours, theirs = BLOCK.format(i=layer) + "ffn.", LAYER.format(i=layer) + mlp
    return [TensorRule(ours + "up.weight", (theirs + "gate_proj.weight", theirs + "up_proj.weight"), "cat",
                       (hidden, hidden)),
            TensorRule(ours + "down.weight", (theirs + "down_proj.weight",))]


def expert_rules(layer: int, ffn: Any) -> list[TensorRule]:
    """Router `mlp.gate` and the per-expert MLPs `mlp.experts.{e}.*` as our stacked tensors."""
    ours, theirs = BLOCK.format(i=layer) + "ffn.", LAYER.format(i=layer) + "mlp."
    experts = theirs + "experts.{e}."
    return [TensorRule(ours + "router.weight", (theirs + "gate.weight",)),
            TensorRule(ours + "w_in", (experts + "gate_proj.weight", experts + "up_proj.weight"), "experts",
                       (ffn.hidden, ffn.hidden)),
            TensorRule(ours + "w_out", (experts + "down_proj.weight",), "experts")]


def shared_rules(layer: int, ffn: Any, name: str) -> list[TensorRule]:
    """The shared experts, stored as one MLP `name` of their summed width, as our `ffn.shared`."""
    return [TensorRule(r.ours.replace(".ffn.", ".ffn.shared.", 1), r.theirs, r.join, r.sizes)
            for r in mlp_rules(layer, ffn.shared_experts * ffn.hidden, f"mlp.{name}.")]


# ------------------------------------------------------------------ config: HF -> ours

def _overrides(hf: Mapping[str, Any], name: str) -> list[str]:
    llama.full_attention_layers(hf)
    # Qwen3MoeConfig also takes the name num_local_experts (its attribute map): a file stating it means it.
    experts = hf["num_local_experts"] if hf.get("num_local_experts") is not None else hf["num_experts"]
    if not experts or experts < 1:
        raise ConfigError("num_experts", experts, "cannot be represented: a model without experts is a dense "
                          "Qwen (model_type qwen2/qwen3)", "an integer >= 1")
    step = hf.get("decoder_sparse_step", 1)
    step = 1 if step is None else step
    if step < 1:
        raise ConfigError("decoder_sparse_step", step, "must be positive", "an integer >= 1")
    n, mlp_only = hf["num_hidden_layers"], set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in mlp_only or (i + 1) % step]
    out = [o for o in llama._overrides(hf, name, window_key="_never") if not o.startswith("ffn=")]
    out += [override("model.n_experts", experts), override("model.experts_per_token", hf["num_experts_per_tok"]),
            override("model.expert_ffn_dim", hf["moe_intermediate_size"]),
            override("model.router_aux_loss_coef", hf["router_aux_loss_coef"]),
            override("ffn.normalize_top_k", bool(hf["norm_topk_prob"]))]
    if dense:
        out.append(override("model.layer_pattern", [{"layers": dense, "ffn": "dense"}]))
    return out


def qwen2_moe_overrides(hf: Mapping[str, Any]) -> list[str]:
    shared, width = hf.get("shared_expert_intermediate_size"), hf["moe_intermediate_size"]
    if not shared or shared % width:
        raise ConfigError("shared_expert_intermediate_size", shared,
                          f"cannot be represented: our shared experts are a whole number of "
                          f"moe_intermediate_size={width} wide experts", f"a positive multiple of {width}")
    return [*_overrides(hf, "qwen2_moe"), "ffn=qwen_moe", override("model.n_shared_experts", shared // width),
            override("model.qkv_bias", bool(hf["qkv_bias"])), "model.attention_bias=false"]


def qwen3_moe_overrides(hf: Mapping[str, Any]) -> list[str]:
    return [*_overrides(hf, "qwen3_moe"), "ffn=moe", "model.n_shared_experts=0", "model.qk_norm=true"]


# ------------------------------------------------------------------ config: ours -> HF

def _expresses(attention: Any, ffn: Any) -> Expresses:
    # Some decoder layers may have a dense MLP instead (mlp_only_layers), all of one width.
    return Expresses(groups={"position": rope_position(), "norm": RMSNORM, "activation": GATED,
                             "attention": attention, "ffn": ffn, "topology": {"decoder_only": TOPOLOGY}},
                     model=PLAIN_MODEL, layers={"ffn": dense()}, rules=(ONE_DENSE_WIDTH,))


EXPRESSES = {
    # Biases on q, k, v (qkv_bias) but not o; one shared expert MLP gated by sigmoid(x w).
    "qwen2_moe": _expresses(gqa(qkv_bias=ANY, out_bias=only(False)),
                            moe(normalize_top_k=ANY, shared_gate=only(True),
                                shared_experts=where(lambda v, spec: v >= 1, "an integer >= 1",
                                                     "a Qwen2-MoE without its shared expert"))),
    # QK-norm always; attention_bias on all four projections; no shared expert.
    "qwen3_moe": _expresses(gqa(qk_norm=only(True)), moe(normalize_top_k=ANY)),
}


def _hf_config(spec: Any, name: str) -> dict[str, Any]:
    m, attention, ffn = spec.model, spec.params["attention"], spec.params["ffn"]
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": dense_width(spec),
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, GATED_BACK),
        "use_sliding_window": False, "sliding_window": None,
        "num_experts": ffn.num_experts, "num_experts_per_tok": ffn.top_k, "moe_intermediate_size": ffn.hidden,
        "norm_topk_prob": ffn.normalize_top_k, "router_aux_loss_coef": ffn.aux_loss_coef,
        "decoder_sparse_step": 1, "mlp_only_layers": sorted(dense_layers(spec)), **rope_back(spec),
    }


def qwen2_moe_config(spec: Any) -> dict[str, Any]:
    ffn = spec.params["ffn"]
    return {**_hf_config(spec, "qwen2_moe"), "qkv_bias": spec.params["attention"].qkv_bias,
            "shared_expert_intermediate_size": ffn.shared_experts * ffn.hidden}


def qwen3_moe_config(spec: Any) -> dict[str, Any]:
    return {**_hf_config(spec, "qwen3_moe"), "attention_bias": spec.params["attention"].out_bias}


# ------------------------------------------------------------------ tensors

def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's attention, norm and embedding rules, QK-norm, and each layer's MLP or experts."""
    rules = [r for r in llama.tensors(spec) if ".ffn." not in r.ours]
    for i in range(spec.model.n_layers):
        ffn = spec.params_for("ffn", i)
        if ffn.plugin == "dense":
            rules += mlp_rules(i, ffn.hidden)
            continue
        rules += expert_rules(i, ffn)
        if ffn.shared_experts:
            rules += shared_rules(i, ffn, "shared_expert")
        if ffn.shared_gate:
            rules.append(TensorRule(BLOCK.format(i=i) + "ffn.shared_gate.weight",
                                    (LAYER.format(i=i) + "mlp.shared_expert_gate.weight",)))
    return rules


def _type(name: str, architecture: str, overrides: Any, config: Any, **extra: Any) -> ModelType:
    # head_dim: not a field of these config classes, but stated by checkpoints and read by the modeling code
    return ModelType(name, architecture, overrides, config, tensors, llama.IGNORE, expresses=EXPRESSES[name],
                     defaults=DEFAULTS[name], extra_fields={"head_dim": None, **extra})


TYPES = (
    _type("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe_overrides, qwen2_moe_config),
    # Qwen3MoeConfig's other name for num_experts, and a window field its published configs still carry.
    _type("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_overrides, qwen3_moe_config, num_local_experts=None,
          max_window_layers=None),
)

guess = family_guess(TYPES)
