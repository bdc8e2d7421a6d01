"""SmolLM3 (SmolLM3ForCausalLM): LLaMA's block and checkpoint layout with some layers
that do not rotate their queries and keys (NoPE).

`no_rope_layers` holds a flag per layer (1: RoPE, 0: none); left out, every
`no_rope_layer_interval`-th layer has none. The NoPE layers read as a layer pattern:
`model.layer_pattern=[{layers: [...], attention: {rotary: false}}]`. Windowed layers
(`use_sliding_window`, `layer_types`) are refused.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, where
from ..mapping import ModelType, override
from . import llama
from .common import GATED, PLAIN_MODEL, RMSNORM, SPLIT_HEADS, TOPOLOGY, dense, family_guess, gqa, rope_position

DEFAULTS = {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
            "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu",
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "pad_token_id": 128004,
            "bos_token_id": 128000, "eos_token_id": 128001, "rope_theta": 2000000.0, "rope_parameters": None,
            "use_sliding_window": False, "sliding_window": None, "no_rope_layers": None,
            "no_rope_layer_interval": 4, "layer_types": None, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": True}


def rope_flags(hf: Mapping[str, Any]) -> list[int]:
    """Each layer's flag: 1 rotates, 0 does not (no_rope_layers, or SmolLM3Config's default from
    no_rope_layer_interval)."""
    n, interval, flags = hf["num_hidden_layers"], hf["no_rope_layer_interval"], hf.get("no_rope_layers")
    if flags is None:
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError("no_rope_layer_interval", interval, "cannot be represented: must be a whole "
                              "number >= 1", ["1, 2, 3, ..."])
        return [int((i + 1) % interval != 0) for i in range(n)]
    if len(flags) != n or any(f not in (0, 1) for f in flags):
        raise ConfigError("no_rope_layers", flags, f"cannot be represented: one flag, 0 or 1, per layer ({n} layers)",
                          [f"{n} of 0 or 1"])
    return [int(f) for f in flags]


def smollm3_overrides(hf: Mapping[str, Any]) -> list[str]:
    llama.full_attention_layers(hf)
    nope = [i for i, f in enumerate(rope_flags(hf)) if not f]
    out = llama._overrides(hf, "smollm3")
    if nope:
        out.append(override("model.layer_pattern", [{"layers": nope, "attention": {"rotary": False}}]))
    return out


def smollm3_config(spec: Any) -> dict[str, Any]:
    out = {k: v for k, v in llama.hf_config(spec).items() if k in TYPES[0].fields}
    out["no_rope_layers"] = [int(spec.params_for("attention", i).rotary) for i in range(spec.model.n_layers)]
    return {**out, "use_sliding_window": False}


def _same(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["attention"], field), f"attention.{field}",
                 f"an attention {field.replace('_', ' ')} that differs from layer to layer")


ATTENTION = gqa(rotary=ANY)
EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": RMSNORM, "activation": GATED, "attention": ATTENTION,
            "ffn": dense(bias=ANY), "topology": {"decoder_only": TOPOLOGY}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS},
    # no_rope_layers: any layer with or without RoPE, every other attention setting shared.
    layers={"attention": {"gqa": {**{f: _same(f) for f in ("num_kv_heads", "qkv_bias", "out_bias")},
                                  "rotary": ANY}}})

TYPES = (ModelType("smollm3", "SmolLM3ForCausalLM", smollm3_overrides, smollm3_config, llama.tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
