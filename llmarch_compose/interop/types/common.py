"""Helpers the model-type tables share: reading HF config fields and writing overrides."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from ...errors import ConfigError
from ..hf import override

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


def rope(hf: Mapping[str, Any]) -> list[str]:
    """model.rope_theta, model.rope_scaling and model.rotary_fraction from either
    spelling: transformers 5's rope_parameters or rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    out = [override("model.rope_theta", float(theta))]
    fraction = hf.get("partial_rotary_factor", merged.get("partial_rotary_factor", 1.0))
    out.append(override("model.rotary_fraction", float(fraction)))
    if kind == "default":
        return out
    if kind not in ("linear", "dynamic", "llama3", "yarn"):
        raise ConfigError("rope_scaling.rope_type", kind, "no RoPE scaling of this type",
                          ["default", "linear", "dynamic", "llama3", "yarn"])
    ours: dict[str, Any] = {"type": kind, "factor": float(merged.get("factor", 1.0))}
    original = merged.get("original_max_position_embeddings")
    if original is None and kind != "linear":
        original = hf.get("max_position_embeddings")
    if original is not None:
        ours["original_max_seq_len"] = int(original)
    for theirs, key in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                        ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                        ("attention_factor", "attention_factor"), ("mscale", "mscale"),
                        ("mscale_all_dim", "mscale_all_dim")):
        if merged.get(theirs) is not None:
            ours[key] = float(merged[theirs])
    return [*out, override("model.rope_scaling", ours)]


def rope_back(spec: Any) -> dict[str, Any]:
    """The HF rope fields of our spec (both spellings, so old and new readers agree)."""
    m = spec.model
    out: dict[str, Any] = {"rope_theta": m.rope_theta}
    s = spec.params["position"].scaling if hasattr(spec.params["position"], "scaling") else None
    params: dict[str, Any] = {"rope_theta": m.rope_theta, "rope_type": "default"}
    if s is not None:
        scaling = {"rope_type": s.type, "factor": s.factor}
        if s.original_max_seq_len:
            scaling["original_max_position_embeddings"] = s.original_max_seq_len
        if s.type == "llama3":
            scaling.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor)
        if s.type == "yarn":
            scaling.update(beta_fast=s.beta_fast, beta_slow=s.beta_slow)
            for key in ("attention_factor", "mscale", "mscale_all_dim"):
                if getattr(s, key) is not None:
                    scaling[key] = getattr(s, key)
        out["rope_scaling"] = scaling
        params.update(scaling)
    out["rope_parameters"] = params
    if m.rotary_fraction != 1.0:
        out["partial_rotary_factor"] = m.rotary_fraction
    return out


def numbers(hf: Mapping[str, Any], table: Mapping[str, str]) -> list[str]:
    """Overrides for the HF fields present in `hf`, by a {hf field: our key} table."""
    return [override(ours, hf[theirs]) for theirs, ours in table.items() if hf.get(theirs) is not None]


Mismatch = tuple[str, Any, str]  # (key, value, what the model type has instead)


def wrong_plugin_or_topology(spec: Any, model: str, plugins: Mapping[str, str],
                             topology: Mapping[str, Any]) -> Optional[Mismatch]:
    """The first group whose plugin, or topology option whose value, `model` cannot hold."""
    p = spec.params
    for group, plugin in plugins.items():
        if p[group].plugin != plugin:
            return group, p[group].name, f"{model} has {plugin}"
    for key, value in topology.items():
        if getattr(p["topology"], key) != value:
            return f"topology.{key}", getattr(p["topology"], key), f"{model} has {value!r}"
    return None


def first_failed(checks: Sequence[tuple[str, Any, bool, str]]) -> Optional[Mismatch]:
    """The first (key, value, holds, why) check that does not hold, as a Mismatch."""
    return next(((key, value, why) for key, value, ok, why in checks if not ok), None)


def ensure_fits(problem: Optional[Mismatch], model_type: str) -> None:
    """Refuse to write a model the type cannot express, naming the key."""
    if problem:
        raise ConfigError(problem[0], problem[1], f"cannot be written as model_type {model_type}: {problem[2]}")


def refuse(hf: Mapping[str, Any], field: str, why: str, allowed: Any = (None, False)) -> None:
    """A field we cannot represent: a clear error naming it and why."""
    value = hf.get(field)
    if value not in allowed:
        raise ConfigError(field, value, f"cannot be represented: {why}", [repr(a) for a in allowed])
