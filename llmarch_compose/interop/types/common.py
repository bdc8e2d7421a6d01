"""What the model-type tables share: reading HF config fields, writing overrides, and the
building blocks of their declarations (see `..fit`)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..fields import unused  # noqa: F401  (the families mark fields they decided not to use)
from ..fit import ANY, Allowed, fits, only, where
from ..mapping import override

# HF activation names -> (our activation for a gated FFN, for a plain one)
ACTIVATIONS = {
    "silu": ("swiglu", "silu"), "swish": ("swiglu", "silu"),
    "gelu": ("geglu", "gelu"), "gelu_new": ("geglu_tanh", "gelu_tanh"),
    "gelu_pytorch_tanh": ("geglu_tanh", "gelu_tanh"), "relu": ("reglu", "relu"),
}


def activation(hf: Mapping[str, Any], key: str, gated: bool) -> str:
    name = hf.get(key)
    if name not in ACTIVATIONS:
        raise ConfigError(key, name, "no plugin for this activation", sorted(ACTIVATIONS))
    return ACTIVATIONS[name][0 if gated else 1]


def rope_values(hf: Mapping[str, Any]) -> tuple[float, float, Optional[dict[str, Any]]]:
    """(theta, rotary fraction, our scaling mapping or None) from either spelling:
    transformers 5's rope_parameters or rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    fraction = hf.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return float(theta), float(fraction), None
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError("rope_scaling.rope_type", kind, "no RoPE scaling of this type",
                          ["default", "linear", "dynamic", "llama3", "yarn"])
    ours: dict[str, Any] = {"type": kind, "factor": float(merged.get("factor", 1.0))}
    original = merged.get("original_max_position_embeddings")
    if kind == "dynamic" or (original is None and kind != "linear"):
        # transformers' dynamic NTK scales past max_position_embeddings, whatever else is stated.
        original = hf.get("max_position_embeddings")
    if original is not None:
        ours["original_max_seq_len"] = int(original)
    if kind == "yarn" and merged.get("truncate") is not None:  # false: the ramp's ends unrounded (gpt-oss)
        ours["truncate"] = bool(merged["truncate"])
    for theirs, key in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                        ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                        ("attention_factor", "attention_factor"), ("mscale", "mscale"),
                        ("mscale_all_dim", "mscale_all_dim")):
        if merged.get(theirs) is not None:
            ours[key] = float(merged[theirs])
    return float(theta), float(fraction), ours


LAYER_KINDS = ("sliding_attention", "full_attention")
#: The RoPE scalings a RoPE per layer type may have (dynamic NTK rescales at run time, per config).
SCALED_BY_LAYER_TYPE = ("default", "linear", "llama3", "yarn")


def rope_by_layer_position(**changes: Allowed) -> dict[str, dict[str, Allowed]]:
    """`rope_position` for a type with a RoPE per layer type: no dynamic scaling."""
    out = rope_position(**changes)
    out["rope"]["scaling.type"] = only(*SCALED_BY_LAYER_TYPE[1:])
    return out


def rope_by_layer_type(hf: Mapping[str, Any], legacy: Mapping[str, str], default_theta: Mapping[str, float],
                       scaled: tuple[str, ...]) -> dict[str, tuple[float, Optional[dict[str, Any]]]]:
    """Each layer type's (RoPE base, our scaling or None), for configs that key rope_parameters by
    layer type (Gemma-3, ModernBERT): else `legacy[kind]` names the field of each type's base
    (rope_theta, rope_local_base_freq, global_rope_theta ...), `default_theta[kind]` what a config
    without either means, and rope_scaling applies to the types in `scaled`."""
    given = hf.get("rope_parameters") or {}
    if not isinstance(given, Mapping) or any(k not in LAYER_KINDS for k in given):
        raise ConfigError("rope_parameters", given, "cannot be represented: this config keys them by layer type",
                          [f"{{{', '.join(LAYER_KINDS)}: {{rope_type, rope_theta, ...}}}}"])
    per = {kind: dict(given.get(kind) or {"rope_type": "default"}) for kind in LAYER_KINDS}
    for kind in scaled:
        per[kind].update(hf.get("rope_scaling") or {})
    out = {}
    for kind in LAYER_KINDS:
        params = per[kind]
        old = hf.get(legacy[kind])
        params.setdefault("rope_theta", old if old is not None else default_theta[kind])
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"rope_parameters.{kind}.partial_rotary_factor", params["partial_rotary_factor"],
                              "cannot be represented: the RoPE of each layer type turns the whole head", [1.0])
        theta, _, scaling = rope_values({"rope_parameters": params,
                                         "max_position_embeddings": hf.get("max_position_embeddings")})
        if scaling is not None and scaling["type"] == "dynamic":  # it would grow one base for all layer types
            raise ConfigError(f"rope_parameters.{kind}.rope_type", "dynamic", "cannot be represented: dynamic "
                              "NTK scaling of one layer type's RoPE", list(SCALED_BY_LAYER_TYPE))
        out[kind] = (theta, scaling)
    return out


def rope(hf: Mapping[str, Any]) -> list[str]:
    """model.rope_theta, model.rope_scaling and model.rotary_fraction (see `rope_values`)."""
    theta, fraction, scaling = rope_values(hf)
    out = [override("model.rope_theta", theta), override("model.rotary_fraction", fraction)]
    return out if scaling is None else [*out, override("model.rope_scaling", scaling)]


def rope_back(spec: Any, position: Any = None) -> dict[str, Any]:
    """The HF rope fields of our spec (both spellings, so old and new readers agree); with
    dynamic scaling also max_position_embeddings, the length past which it scales.
    `position`: a layer's own position params (default: the model-wide ones)."""
    position = spec.params["position"] if position is None else position
    out: dict[str, Any] = {"rope_theta": position.theta}
    s = position.scaling
    params: dict[str, Any] = {"rope_theta": position.theta, "rope_type": "default"}
    if s is not None:
        scaling = {"rope_type": s.type, "factor": s.factor}
        if s.original_max_seq_len:
            scaling["original_max_position_embeddings"] = s.original_max_seq_len
        if s.type == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
            if not s.truncate:
                scaling["truncate"] = False
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(s, key) is not None:
                    scaling[key] = getattr(s, key)
        if s.type == "dynamic":  # transformers' dynamic NTK starts past max_position_embeddings
            scaling.pop("original_max_position_embeddings", None)
            out["max_position_embeddings"] = s.original_max_seq_len
        out["rope_scaling"] = scaling
        params.update(scaling)
    out["rope_parameters"] = params
    if position.fraction != 1.0:
        out["partial_rotary_factor"] = position.fraction
    return out


def numbers(hf: Mapping[str, Any], table: Mapping[str, str]) -> list[str]:
    """Overrides for the HF fields present in `hf`, by a {hf field: our key} table."""
    return [override(ours, hf[theirs]) for theirs, ours in table.items() if hf.get(theirs) is not None]


def refuse(hf: Mapping[str, Any], field: str, why: str, allowed: Any = (None, False)) -> None:
    """A field we cannot represent: a clear error naming it and why."""
    value = hf.get(field)
    if value not in allowed:
        raise ConfigError(field, value, f"cannot be represented: {why}", [repr(a) for a in allowed])


# ------------------------------------------------------------------ declaration building blocks

def _with(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


#: Every TopologyParams option, at the value that leaves a plain pre-norm stack and head.
TOPOLOGY = {
    "norm_position": only("pre"), "parallel_residual": only(False), "shared_norm": only(False),
    "residual": only("standard"),
    "share_layers": only(False), "embedding_norm": only(False), "scale_embeddings": only(False),
    "tie_embeddings": where(lambda v, spec: v == spec.model.tie_embeddings, "model.tie_embeddings",
                            "a head tied otherwise than model.tie_embeddings says"),
    "mlm_transform": only(False), "head_bias": only("none"), "scale_tied_head": only(False),
    "normalize_head": only(False), "final_logit_softcap": only(None), "logit_scale": only(None),
}


def topology(**changes: Allowed) -> dict[str, Allowed]:
    """TOPOLOGY with the options a type has otherwise."""
    return _with(TOPOLOGY, **changes)


#: Every RopeScaling field; the scaling types transformers' rope utilities compute as ours do.
ROPE_SCALINGS = ("linear", "dynamic", "llama3", "yarn")


def rope_position(fraction: Allowed = only(1.0), interleaved: Allowed = only(False)) -> dict[str, dict[str, Allowed]]:
    scaling = {f"scaling.{k}": ANY for k in ("factor", "original_max_seq_len", "low_freq_factor",
                                              "high_freq_factor", "beta_fast", "beta_slow", "attention_factor",
                                              "mscale", "mscale_all_dim", "truncate")}
    return {"rope": {"theta": ANY, "fraction": fraction, "interleaved": interleaved, "scaling": ANY,
                     "scaling.type": only(*ROPE_SCALINGS), **scaling}}


RMSNORM = {"rmsnorm": {"eps": ANY}}
LAYERNORM = {"layernorm": {"eps": ANY, "bias": only(True)}}

#: Gated activations and the hidden_act that a gated (LLaMA-style) MLP applies to its gate.
GATED_BACK = {("swiglu", None): "silu", ("geglu", "none"): "gelu", ("geglu", "tanh"): "gelu_pytorch_tanh",
              ("reglu", None): "relu"}
GATED = {"swiglu": {}, "geglu": {"approximate": only("none", "tanh")}, "reglu": {}}
#: Plain activations and their HF names (GPT-2, BERT, BART's activation_function).
PLAIN_BACK = {("gelu", "tanh"): "gelu_new", ("gelu", "none"): "gelu", ("relu", None): "relu", ("silu", None): "silu"}
PLAIN = {"gelu": {"approximate": only("none", "tanh")}, "relu": {}, "silu": {}}


def activation_back(spec: Any, table: Mapping[tuple[str, Any], str]) -> str:
    act = spec.params["activation"]
    return table[act.plugin, getattr(act, "approximate", None)]


def gqa(**changes: Allowed) -> dict[str, dict[str, Allowed]]:
    """attention=gqa as LLaMA has it (any KV heads, one bias flag for all four projections,
    no window, QK-norm, custom scale or softcap), with a type's differences."""
    base = {"num_kv_heads": ANY,
            "qkv_bias": where(lambda v, spec: v == spec.params["attention"].out_bias, "attention.out_bias",
                              "biases on q, k and v but not on the output (or the reverse)"),
            "out_bias": ANY, "window": only(None), "scale": only(None), "qk_norm": only(False), "softcap": only(None)}
    return {"gqa": _with(base, **changes)}


#: Multi-head attention with every projection biased (GPT-2, BERT, BART).
MHA_BIASED = gqa(num_kv_heads=where(lambda v, spec: v == spec.model.n_heads, "model.n_heads",
                                    "grouped key/value heads"),
                 qkv_bias=only(True), out_bias=only(True))

PLAIN_MODEL = {"head_dim": ANY, "tie_embeddings": ANY, "embedding_dim": only(None), "type_vocab_size": only(0)}
SPLIT_HEADS = where(lambda v, spec: v * spec.model.n_heads == spec.model.d_model, "model.d_model / model.n_heads",
                    "a head_dim other than d_model / n_heads")


#: One bias flag for every projection of attention and MLP (StarCoder2's use_bias, OPT's enable_bias).
SAME_BIAS = where(lambda v, spec: v == spec.params["attention"].out_bias, "attention.out_bias",
                  "biases on the MLP but not on attention (or the reverse)")


def dense(bias: Allowed = only(False)) -> dict[str, dict[str, Allowed]]:
    return {"dense": {"hidden": ANY, "bias": bias}}


def moe(**changes: Allowed) -> dict[str, dict[str, Allowed]]:
    """ffn=moe as Mixtral routes (softmax top-k, renormalized or not, dropless, no groups,
    shared experts or selection bias), with a type's differences. The loss weights only
    train, so any value is written."""
    base = {"num_experts": ANY, "top_k": ANY, "hidden": ANY, "normalize_top_k": only(True), "aux_loss_coef": ANY,
            "router": only("softmax"), "n_groups": ANY,
            "topk_groups": where(lambda v, spec: v == spec.params["ffn"].n_groups, "ffn.n_groups",
                                 "group-limited routing"),
            "routed_scaling": only(1.0), "bias_update_rate": only(0.0), "shared_experts": only(0),
            "shared_gate": only(False), "capacity_factor": only(None), "capacity": only(None),
            "dropped": ANY, "z_loss_coef": ANY}
    return {"moe": _with(base, **changes)}


def family_guess(types: Any):
    """A family module's `guess(spec)`: the first of its types that fits, or None."""
    def guess(spec: Any) -> Optional[str]:
        return next((t.name for t in types if fits(spec, t, guessing=True)), None)

    return guess
