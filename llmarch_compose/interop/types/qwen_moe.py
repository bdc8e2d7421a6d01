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
from ..hf import ModelType, TensorRule, override
from . import llama
from .common import refuse, rope_back

LAYER, BLOCK = llama.LAYER, llama.BLOCK


# ------------------------------------------------------------------ helpers the MoE families share

def rope_truncate(hf: Mapping[str, Any]) -> None:
    """YaRN's `truncate: false` (unrounded correction range) has no counterpart in our rope."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (params.get("rope_type") or params.get("type")) == "yarn" and params.get("truncate") is False:
        raise ConfigError("rope_parameters.truncate", False, "cannot be represented: our YaRN always rounds "
                          "its correction range to whole dimensions", [None, True])


def dense_layers(spec: Any) -> Optional[dict[int, Any]]:
    """The decoder layers a layer_pattern gives a dense FFN ({layer: its ffn params}), or
    None when a rule changes anything else (another group, or the experts themselves)."""
    out = {}
    for (stack, layer), changes in spec.layer_params.items():
        if stack != "decoder" or not changes:
            continue
        if set(changes) != {"ffn"} or changes["ffn"].plugin != "dense":
            return None
        out[layer] = changes["ffn"]
    return out


def dense_width(spec: Any, dense: Mapping[int, Any]) -> tuple[Optional[int], Optional[str]]:
    """The one hidden width of the dense layers (the checkpoint's intermediate_size), or a reason why not."""
    widths = {p.hidden for p in dense.values()}
    if len(widths) > 1:
        return None, f"the dense layers differ in width ({sorted(widths)}); the checkpoint has one intermediate_size"
    if any(p.bias for p in dense.values()):
        return None, "the dense MLP layers have no biases"
    return (widths.pop() if widths else spec.model.ffn_dim), None


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


def group_problem(spec: Any, want: Mapping[str, str]) -> Optional[tuple[str, Any, str]]:
    p = {g: spec.params[g].plugin for g in spec.params}
    for group, plugin in want.items():
        if p[group] != plugin:
            return group, p[group], f"the checkpoint's {group} is {plugin}"
    return None


# ------------------------------------------------------------------ config: HF -> ours

def _overrides(hf: Mapping[str, Any], name: str) -> list[str]:
    refuse(hf, "use_sliding_window", "Qwen windows only some layers (max_window_layers)")
    sliding = [i for i, t in enumerate(hf.get("layer_types") or []) if t != "full_attention"]
    if sliding:
        raise ConfigError("layer_types", hf["layer_types"], f"cannot be represented: layers {sliding} are "
                          "not full attention", ["full_attention in every layer"])
    rope_truncate(hf)
    experts = hf.get("num_experts", hf.get("num_local_experts"))
    if not experts or experts < 1:
        raise ConfigError("num_experts", experts, "cannot be represented: a model without experts is a dense "
                          "Qwen (model_type qwen2/qwen3)", "an integer >= 1")
    step = hf.get("decoder_sparse_step", 1)
    step = 1 if step is None else step
    if step < 1:
        raise ConfigError("decoder_sparse_step", step, "must be positive", "an integer >= 1")
    n, only = hf["num_hidden_layers"], set(hf.get("mlp_only_layers") or [])
    dense = [i for i in range(n) if i in only or (i + 1) % step]
    out = [o for o in llama._overrides(hf, name, window_key="_never") if not o.startswith("ffn=")]
    out += [override("model.norm_eps", hf.get("rms_norm_eps", 1e-6)),  # the configs' default, not our preset's
            override("model.n_experts", experts), override("model.experts_per_token", hf["num_experts_per_tok"]),
            override("model.expert_ffn_dim", hf["moe_intermediate_size"]),
            override("model.router_aux_loss_coef", hf.get("router_aux_loss_coef", 0.001)),
            override("ffn.normalize_top_k", bool(hf.get("norm_topk_prob", False)))]
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
            override("model.qkv_bias", bool(hf.get("qkv_bias", True))), "model.attention_bias=false"]


def qwen3_moe_overrides(hf: Mapping[str, Any]) -> list[str]:
    return [*_overrides(hf, "qwen3_moe"), "ffn=moe", "model.n_shared_experts=0", "model.qk_norm=true"]


# ------------------------------------------------------------------ config: ours -> HF

GROUPS = {"topology": "decoder_only", "position": "rope", "norm": "rmsnorm", "attention": "gqa", "ffn": "moe",
          "activation": "swiglu"}


def _problem(spec: Any, name: str) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` model type `name` cannot express: (key, value, why), or None."""
    problem = group_problem(spec, GROUPS)
    if problem:
        return problem
    m, attention, ffn = spec.model, spec.params["attention"], spec.params["ffn"]
    dense = dense_layers(spec)
    if dense is None:
        return "model.layer_pattern", m.layer_pattern, "only whole dense-MLP layers (mlp_only_layers) differ"
    _, why = dense_width(spec, dense)
    if why:
        return "model.layer_pattern", m.layer_pattern, why
    qwen2 = name == "qwen2_moe"
    checks = [
        ("model.rotary_fraction", m.rotary_fraction, 1.0, "Qwen rotates the whole head"),
        ("model.rope_interleaved", m.rope_interleaved, False, "Qwen rotates the two halves of each head"),
        ("attention.window", attention.window, None, "the sliding window of a Qwen checkpoint skips layers"),
        ("model.attention_scale", attention.scale, None, "Qwen scales scores by 1/sqrt(head_dim)"),
        ("ffn.router", ffn.router, "softmax", "Qwen routes by softmax"),
        ("ffn.routed_scaling", ffn.routed_scaling, 1.0, "Qwen does not scale the routed experts"),
        ("ffn.capacity", (ffn.capacity, ffn.capacity_factor), (None, None), "Qwen drops no tokens"),
        ("ffn.bias_update_rate", ffn.bias_update_rate, 0.0, "Qwen has no selection bias"),
        ("ffn.shared_gate", ffn.shared_gate, qwen2, "qwen2_moe gates its shared expert, qwen3_moe has none"),
        ("model.qk_norm", attention.qk_norm, not qwen2, "qwen3_moe has QK-norm, qwen2_moe has not"),
    ]
    if ffn.topk_groups != ffn.n_groups:
        return "ffn.topk_groups", ffn.topk_groups, "Qwen's routing is not group-limited"
    if qwen2:
        checks += [("ffn.shared_experts", ffn.shared_experts >= 1, True, "qwen2_moe has a shared expert"),
                   ("model.attention_bias", attention.out_bias, False, "qwen2_moe's o_proj has no bias")]
    else:
        checks += [("ffn.shared_experts", ffn.shared_experts, 0, "qwen3_moe has no shared expert"),
                   ("model.qkv_bias", attention.qkv_bias, attention.out_bias,
                    "qwen3_moe's attention_bias covers q, k, v and o alike")]
    for key, value, want, why in checks:
        if value != want:
            return key, value, why
    return None


def _hf_config(spec: Any, name: str) -> dict[str, Any]:
    problem = _problem(spec, name)
    if problem:
        raise ConfigError(problem[0], problem[1], f"cannot be written as model_type {name}: {problem[2]}")
    m, attention, ffn = spec.model, spec.params["attention"], spec.params["ffn"]
    dense = dense_layers(spec)
    width, _ = dense_width(spec, dense)
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": width,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "use_sliding_window": False,
        "num_experts": ffn.num_experts, "num_experts_per_tok": ffn.top_k, "moe_intermediate_size": ffn.hidden,
        "norm_topk_prob": ffn.normalize_top_k, "router_aux_loss_coef": ffn.aux_loss_coef,
        "decoder_sparse_step": 1, "mlp_only_layers": sorted(dense), **rope_back(spec),
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
    if spec.params["attention"].qk_norm:
        rules += [TensorRule(BLOCK + f"attn.{n}.weight", (LAYER + f"self_attn.{n}.weight",))
                  for n in ("q_norm", "k_norm")]
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


TYPES = (
    ModelType("qwen2_moe", "Qwen2MoeForCausalLM", qwen2_moe_overrides, qwen2_moe_config, tensors, llama.IGNORE),
    ModelType("qwen3_moe", "Qwen3MoeForCausalLM", qwen3_moe_overrides, qwen3_moe_config, tensors, llama.IGNORE),
)


def guess(spec: Any) -> str | None:
    for name in ("qwen2_moe", "qwen3_moe"):
        if _problem(spec, name) is None:
            return name
    return None
