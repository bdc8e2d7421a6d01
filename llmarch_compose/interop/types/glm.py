"""The GLM family: glm (GLM-4, transformers' GlmForCausalLM), ChatGLM-3's successor layout.

A LLaMA-like decoder with three differences: RoPE turns only the first
`partial_rotary_factor` (0.5) of each head, in interleaved pairs (ChatGLM's
layout: `model.rope_interleaved`); `attention_bias` puts biases on q, k and v
but never on o_proj; the MLP stores gate|up fused as `mlp.gate_up_proj`, which
is our `ffn.up` as is.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..hf import ModelType, TensorRule, override
from . import llama
from .common import rope_back

LAYER, BLOCK = llama.LAYER, llama.BLOCK


def overrides(hf: Mapping[str, Any]) -> list[str]:
    if hf.get("sliding_window"):
        raise ConfigError("sliding_window", hf["sliding_window"], "cannot be represented: GlmForCausalLM has "
                          "no sliding window (its attention ignores the field)", [None])
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    if (params.get("rope_type") or params.get("type")) == "yarn" and params.get("truncate") is False:
        raise ConfigError("rope_parameters.truncate", False, "cannot be represented: our YaRN always rounds "
                          "its correction range to whole dimensions", [None, True])
    # GlmConfig defaults partial_rotary_factor to 0.5 when neither spelling gives it.
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor", 0.5))
    bias = bool(hf.get("attention_bias", True))  # q, k and v only; GlmConfig's default is true
    out = [o for o in llama._overrides(hf, "glm", window_key="_never") if not o.startswith("model.rotary_fraction=")]
    return [*out, override("model.norm_eps", hf.get("rms_norm_eps", 1.5625e-07)),  # GlmConfig's default
            override("model.rotary_fraction", float(fraction)), "model.rope_interleaved=true",
            override("model.qkv_bias", bias), "model.attention_bias=false", "model.mlp_bias=false"]


def _problem(spec: Any) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` GlmForCausalLM cannot express: (key, value, why), or None."""
    p = {g: spec.params[g].plugin for g in spec.params}
    m, attention = spec.model, spec.params["attention"]
    for group, want in (("topology", "decoder_only"), ("position", "rope"), ("norm", "rmsnorm"),
                        ("attention", "gqa"), ("ffn", "dense"), ("activation", "swiglu")):
        if p[group] != want:
            return group, p[group], f"GLM is {want}"
    if any(changes for (stack, _), changes in spec.layer_params.items() if stack == "decoder"):
        return "model.layer_pattern", m.layer_pattern, "GLM's layers are all alike"
    checks = (
        ("model.rope_interleaved", m.rope_interleaved, True, "GLM rotates interleaved pairs"),
        ("model.attention_bias", attention.out_bias, False, "GLM's o_proj has no bias"),
        ("model.mlp_bias", spec.params["ffn"].bias, False, "GLM's MLP has no biases"),
        ("attention.window", attention.window, None, "GLM has no sliding window"),
        ("model.qk_norm", attention.qk_norm, False, "GLM has no QK-norm"),
        ("model.attention_scale", attention.scale, None, "GLM scales scores by 1/sqrt(head_dim)"),
    )
    for key, value, want, why in checks:
        if value != want:
            return key, value, why
    return None


def hf_config(spec: Any) -> dict[str, Any]:
    problem = _problem(spec)
    if problem:
        raise ConfigError(problem[0], problem[1], f"cannot be written as model_type glm: {problem[2]}")
    m, attention = spec.model, spec.params["attention"]
    rope = rope_back(spec)
    # Always explicit: GlmConfig reads a missing partial_rotary_factor as 0.5.
    rope["partial_rotary_factor"] = m.rotary_fraction
    rope["rope_parameters"]["partial_rotary_factor"] = m.rotary_fraction
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": m.ffn_dim,
        "vocab_size": m.vocab_size, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu", "attention_bias": attention.qkv_bias,
        # GlmConfig's padding id defaults to a row of GLM-4's vocabulary, which ours may not have.
        "pad_token_id": None,
        **rope,
    }


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's attention, norm and embedding rules; the fused gate|up copied as it is."""
    rules = [r for r in llama.tensors(spec) if ".ffn." not in r.ours]
    return [*rules, TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.gate_up_proj.weight",)),
            TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.down_proj.weight",))]


TYPES = (ModelType("glm", "GlmForCausalLM", overrides, hf_config, tensors, llama.IGNORE),)


def guess(spec: Any) -> str | None:
    return "glm" if _problem(spec) is None else None
