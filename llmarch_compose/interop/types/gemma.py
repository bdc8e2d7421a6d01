"""The Gemma family: gemma and gemma2 (transformers' GemmaForCausalLM, Gemma2ForCausalLM).

LLaMA's checkpoint layout (`model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `model.norm`, a tied `lm_head`) with three differences
in what it computes: every RMSNorm scales by (1 + w) (`norm.offset=1.0`), the token
embeddings are multiplied by sqrt(hidden_size) (`topology.scale_embeddings`), and
head_dim is its own number (256, where hidden_size / heads is 192 in the 7B).

Gemma-2 adds a norm after each sublayer (`topology.norm_position=sandwich`:
`post_attention_layernorm` follows attention, `pre_feedforward_layernorm` and
`post_feedforward_layernorm` wrap the MLP), tanh caps on the attention scores and on
the logits (`attention.softcap`, `topology.final_logit_softcap`), a query scale of
its own (`query_pre_attn_scalar`: `model.attention_scale`) and per-layer attention
(`layer_types`, sliding layers with one `sliding_window`: a `model.layer_pattern`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ROPE_SPELLINGS, ModelType, TensorRule, override
from . import llama
from .common import (GATED, GATED_BACK, LAYER_KINDS, PLAIN_MODEL, RMSNORM, activation, activation_back, dense,
                     family_guess, gqa, refuse, rope_back, rope_by_layer_position, rope_by_layer_type, rope_position,
                     topology, unused)

# GemmaConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
            "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "pad_token_id": 0, "eos_token_id": 1,
            "bos_token_id": 2, "tie_word_embeddings": True, "rope_theta": 10000.0, "rope_parameters": None,
            "attention_bias": False, "use_bidirectional_attention": None}
# Gemma's first configs name the activation twice; transformers 5 computes hidden_act alone.
EXTRA_FIELDS = {"hidden_activation": None}

# What Gemma's norms and embeddings add to a LLaMA-shaped decoder.
GEMMA = ["norm.offset=1.0", "topology.scale_embeddings=true"]


def overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "use_bidirectional_attention", "GemmaForCausalLM then attends to the whole sequence",
           allowed=(None, False))
    # GemmaConfig reads the released configs' hidden_act "gelu" as the tanh GELU they were trained with.
    act = "gelu_pytorch_tanh" if hf["hidden_act"] == "gelu" else hf["hidden_act"]
    named = hf.get("hidden_activation")
    if named is not None and named != act:
        raise ConfigError("hidden_activation", named, f"cannot be represented: transformers computes hidden_act "
                          f"({act}), so the two must agree", [None, act])
    out = [o for o in llama._overrides(hf, "gemma") if not o.startswith("activation=")]
    return [*out, f"activation={activation({'hidden_act': act}, 'hidden_act', gated=True)}", *GEMMA]


def hf_config(spec: Any) -> dict[str, Any]:
    """LLaMA's fields, those GemmaConfig has (no MLP bias, no window: the fit check has seen to it)."""
    fields = {**ROPE_SPELLINGS, **DEFAULTS}
    return {k: v for k, v in llama.hf_config(spec).items() if k in fields}


# A LLaMA-shaped decoder whose norms scale by (1 + w) and whose embeddings are scaled, with one
# attention_bias flag for q, k, v and o, no MLP bias, no window; no exact GELU (GemmaConfig
# rewrites hidden_act "gelu" as the tanh one).
EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": {"rmsnorm": {**RMSNORM["rmsnorm"], "offset": only(1.0)}},
            "activation": {**GATED, "geglu": {"approximate": only("tanh", why="the exact GELU (GemmaConfig reads "
                                                                      "hidden_act gelu as the tanh one)")}},
            "attention": gqa(), "ffn": dense(),
            "topology": {"decoder_only": topology(scale_embeddings=only(True))}},
    model=PLAIN_MODEL)

# ------------------------------------------------------------------ gemma2

# Gemma2Config()'s defaults, for fields a config.json leaves out.
DEFAULTS2 = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
             "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
             "rope_theta": 10000.0, "rope_parameters": None, "attention_bias": False, "query_pre_attn_scalar": 256,
             "sliding_window": 4096, "layer_types": None, "final_logit_softcapping": 30.0,
             "attn_logit_softcapping": 50.0, "use_bidirectional_attention": None}
# The released configs also say hidden_act and sliding_window_size (transformers 5 reads neither:
# they must agree with hidden_activation and sliding_window), and the generation cache they want.
EXTRA_FIELDS2 = {"hidden_act": None, "sliding_window_size": None, "cache_implementation": None}
SANDWICH = ["topology.norm_position=sandwich"]


def layer_types(hf: Mapping[str, Any], every: int = 2) -> list[str]:
    """Each layer's attention: the config's layer_types, or the config class's default (every
    `every`-th layer full, the others sliding: Gemma2Config's 2, Gemma3TextConfig's 6)."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    kinds = ("sliding_attention", "full_attention")
    if len(types) != n or any(t not in kinds for t in types):
        raise ConfigError("layer_types", types, f"cannot be represented: one of {list(kinds)} per layer "
                          f"({n} layers)", [f"{n} of {list(kinds)}"])
    return list(types)


def gemma2_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "use_bidirectional_attention", "Gemma2ForCausalLM then attends to the whole sequence",
           allowed=(None, False))
    act = hf["hidden_activation"]
    for field, value, same in (("hidden_act", hf.get("hidden_act"), act),
                               ("sliding_window_size", hf.get("sliding_window_size"), hf["sliding_window"])):
        if value is not None and value != same:
            raise ConfigError(field, value, "cannot be represented: transformers reads "
                              f"{'hidden_activation' if field == 'hidden_act' else 'sliding_window'} ({same}), "
                              "so the two must agree", [None, same])
    unused(hf, "cache_implementation")  # how generate caches, not what the model computes
    types = layer_types(hf)
    window = hf["sliding_window"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not window:
        raise ConfigError("sliding_window", window, f"cannot be represented: layers {sliding} are sliding "
                          "attention without a window", ["a number of tokens >= 1"])
    out = [o for o in llama._overrides(hf, "gemma2", act_key="hidden_activation") if not o.startswith("attention=")]
    out += [*GEMMA, *SANDWICH,
            override("model.attention_scale", float(hf["query_pre_attn_scalar"]) ** -0.5),
            override("topology.final_logit_softcap", hf["final_logit_softcapping"])]
    if len(sliding) == len(types):  # every layer windowed: the model-wide window
        out += ["attention=swa", override("model.window", window)]
    else:
        out.append("attention=gqa")
        if sliding:
            out.append(override("model.layer_pattern", [{"layers": sliding, "attention": {"window": window}}]))
    cap = hf["attn_logit_softcapping"]
    return [*out, override("model.attention_softcap", None if cap is None else float(cap))]


def windows(spec: Any) -> list:
    """Each decoder layer's attention window (None: full attention)."""
    return [spec.params_for("attention", i).window for i in range(spec.model.n_layers)]


def gemma2_config(spec: Any) -> dict[str, Any]:
    out = hf_config(spec)
    del out["hidden_act"]
    attention, per_layer = spec.params["attention"], windows(spec)
    scale = attention.scale if attention.scale is not None else spec.model.head_dim ** -0.5
    sliding = sorted({w for w in per_layer if w is not None})
    out.update(hidden_activation=activation_back(spec, GATED_BACK), query_pre_attn_scalar=round(scale ** -2),
               sliding_window=sliding[0] if sliding else None,
               layer_types=["full_attention" if w is None else "sliding_attention" for w in per_layer],
               attn_logit_softcapping=attention.softcap,
               final_logit_softcapping=spec.params["topology"].final_logit_softcap)
    return out


def gemma2_tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's rules with the sandwich's four norms per layer."""
    rules = [r for r in llama.tensors(spec) if not r.ours.endswith("ffn_norm.weight")]
    layer, block = llama.LAYER, llama.BLOCK
    return [*rules, *(TensorRule(block + ours, (layer + theirs,)) for ours, theirs in (
        ("attn_post_norm.weight", "post_attention_layernorm.weight"),
        ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
        ("ffn_post_norm.weight", "post_feedforward_layernorm.weight")))]


def _integral_scalar(scale: Any, spec: Any) -> bool:
    """A query scale Gemma2Config can state: 1 / sqrt(an integer query_pre_attn_scalar)."""
    if scale is None:
        return True
    scalar = scale ** -2
    return round(scalar) >= 1 and abs(scalar - round(scalar)) < 1e-6 * scalar


def _same(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["attention"], field), f"attention.{field}",
                 f"an attention {field.replace('_', ' ')} that differs from layer to layer")


SCALE = where(_integral_scalar, "null, or 1 / sqrt(n) for a whole number n (query_pre_attn_scalar)")
ATTENTION2 = gqa(window=ANY, scale=SCALE, softcap=ANY)
EXPRESSES2 = Expresses(
    groups={"position": rope_position(), "norm": {"rmsnorm": {**RMSNORM["rmsnorm"], "offset": only(1.0)}},
            "activation": GATED, "attention": ATTENTION2, "ffn": dense(),
            "topology": {"decoder_only": topology(scale_embeddings=only(True), norm_position=only("sandwich"),
                                                  final_logit_softcap=ANY)}},
    model=PLAIN_MODEL,
    # layer_types: any layer sliding or full, every other attention setting shared.
    layers={"attention": {"gqa": {**{f: _same(f) for f in ("num_kv_heads", "qkv_bias", "out_bias", "scale",
                                                           "qk_norm", "softcap")}, "window": ANY}}},
    rules=(Rule("model.layer_pattern", lambda spec: sorted({w for w in windows(spec) if w is not None}),
                lambda spec: len({w for w in windows(spec) if w is not None}) <= 1, "one window size",
                "windows of several sizes (Gemma-2 has one sliding_window)"),))

# ------------------------------------------------------------------ gemma3 (text)

# Gemma3TextConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS3 = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
             "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
             "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
             "rope_parameters": None, "attention_bias": False, "query_pre_attn_scalar": 256, "sliding_window": 4096,
             "layer_types": None, "final_logit_softcapping": None, "attn_logit_softcapping": None,
             "use_bidirectional_attention": False}
# The released configs' older spellings: the global layers' base (rope_theta, rope_scaling: the
# mapping's legacy RoPE fields), the local layers' base, and the period of the full layers.
# transformers writes `_sliding_window_pattern` beside layer_types and never reads it back.
EXTRA_FIELDS3 = {"rope_local_base_freq": None, "sliding_window_pattern": None, "_sliding_window_pattern": None,
                 "cache_implementation": None}
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}  # Gemma3TextConfig.default_theta
KINDS = LAYER_KINDS


def gemma3_ropes(hf: Mapping[str, Any]) -> dict[str, tuple[float, Optional[dict[str, Any]]]]:
    """Each layer type's (RoPE base, our scaling or None), as Gemma3TextConfig reads them:
    rope_parameters per layer type, else rope_theta and rope_scaling for the full layers and
    rope_local_base_freq for the sliding ones."""
    return rope_by_layer_type(hf, {"full_attention": "rope_theta", "sliding_attention": "rope_local_base_freq"},
                              GEMMA3_THETA, scaled=("full_attention",))


def gemma3_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "use_bidirectional_attention", "Gemma3ForCausalLM then attends to the whole sequence (and halves "
           "its window)", allowed=(None, False))
    unused(hf, "cache_implementation")  # how generate caches, not what the model computes
    unused(hf, "_sliding_window_pattern")  # written by transformers, read by nothing (layer_types says it)
    every = hf.get("sliding_window_pattern") or 6
    types = layer_types(hf, every)
    window = hf["sliding_window"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    if sliding and not window:
        raise ConfigError("sliding_window", window, f"cannot be represented: layers {sliding} are sliding "
                          "attention without a window", ["a number of tokens >= 1"])
    ropes = gemma3_ropes(hf)
    # The model-wide choice is the sliding layers' (most of them), the full layers' a rule.
    wide = "sliding_attention" if sliding else "full_attention"
    theta, scaling = ropes[wide]
    refuse(hf, "partial_rotary_factor", "Gemma3's default RoPE turns the whole head", allowed=(None, 1.0))
    out = [o for o in llama._overrides(hf, "gemma3_text", act_key="hidden_activation")
           if not o.startswith(("attention=", "model.rope_scaling=", "model.rope_theta=", "model.rotary_fraction="))]
    out += [override("model.rope_theta", theta), override("model.rotary_fraction", 1.0)]
    if scaling is not None:
        out.append(override("model.rope_scaling", scaling))
    out += [*GEMMA, *SANDWICH, "model.qk_norm=true",
            override("model.attention_scale", float(hf["query_pre_attn_scalar"]) ** -0.5),
            override("topology.final_logit_softcap", hf["final_logit_softcapping"])]
    out += ["attention=swa", override("model.window", window)] if sliding else ["attention=gqa"]
    if sliding and full:
        theta, scaling = ropes["full_attention"]
        out.append(override("model.layer_pattern", [{"layers": full, "attention": {"window": None},
                                                     "position": {"theta": theta, "scaling": scaling}}]))
    cap = hf["attn_logit_softcapping"]
    return [*out, override("model.attention_softcap", None if cap is None else float(cap))]


def positions(spec: Any) -> list:
    """Each decoder layer's position params."""
    return [spec.params_for("position", i) for i in range(spec.model.n_layers)]


def _rope_by_kind(spec: Any) -> dict[str, list]:
    """layer type -> the distinct position params of its layers."""
    out: dict[str, list] = {kind: [] for kind in KINDS}
    for w, p in zip(windows(spec), positions(spec)):
        kind = out["full_attention" if w is None else "sliding_attention"]
        if p not in kind:
            kind.append(p)
    return out


def gemma3_config(spec: Any) -> dict[str, Any]:
    out = gemma2_config(spec)
    by_kind = _rope_by_kind(spec)
    rope = {kind: rope_back(spec, params[0] if params else spec.params["position"])["rope_parameters"]
            for kind, params in by_kind.items()}
    out.update(rope_parameters=rope, use_bidirectional_attention=False)
    for legacy in ("rope_theta", "rope_scaling", "partial_rotary_factor"):
        out.pop(legacy, None)
    return {k: v for k, v in out.items() if k in DEFAULTS3}


def gemma3_tensors(spec: Any) -> list[TensorRule]:
    """Gemma-2's rules; the per-head norms of queries and keys come with llama's (qk_norm)."""
    return gemma2_tensors(spec)


def _same_position(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["position"], field), f"position.{field}",
                 f"a position {field} that differs from layer to layer")


EXPRESSES3 = Expresses(
    groups={"position": rope_by_layer_position(), "norm": {"rmsnorm": {**RMSNORM["rmsnorm"], "offset": only(1.0)}},
            "activation": GATED, "attention": gqa(window=ANY, scale=SCALE, softcap=ANY, qk_norm=only(True)),
            "ffn": dense(),
            "topology": {"decoder_only": topology(scale_embeddings=only(True), norm_position=only("sandwich"),
                                                  final_logit_softcap=ANY)}},
    model=PLAIN_MODEL,
    # layer_types, with a RoPE of their own for each: any layer sliding or full.
    layers={"attention": EXPRESSES2.layers["attention"],
            "position": rope_by_layer_position(fraction=_same_position("fraction"),
                                      interleaved=_same_position("interleaved"))},
    rules=(*EXPRESSES2.rules,
           Rule("model.layer_pattern", lambda spec: list(spec.model.layer_pattern),
                lambda spec: all(len(p) <= 1 for p in _rope_by_kind(spec).values()),
                "one RoPE for the sliding layers and one for the full ones",
                "RoPE that differs between layers of one type (Gemma-3 has one per layer type)")))

TYPES = (ModelType("gemma", "GemmaForCausalLM", overrides, hf_config, llama.tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),
         ModelType("gemma2", "Gemma2ForCausalLM", gemma2_overrides, gemma2_config, gemma2_tensors, llama.IGNORE,
                   expresses=EXPRESSES2, defaults=DEFAULTS2, extra_fields=EXTRA_FIELDS2),
         ModelType("gemma3_text", "Gemma3ForCausalLM", gemma3_overrides, gemma3_config, gemma3_tensors,
                   llama.IGNORE, expresses=EXPRESSES3, defaults=DEFAULTS3, extra_fields=EXTRA_FIELDS3))

guess = family_guess(TYPES)
