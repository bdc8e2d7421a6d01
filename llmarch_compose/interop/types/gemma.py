"""The Gemma family: gemma (transformers' GemmaForCausalLM).

LLaMA's checkpoint layout (`model.layers.{i}.self_attn.{q,k,v,o}_proj`,
`mlp.{gate,up,down}_proj`, `model.norm`, a tied `lm_head`) with three differences
in what it computes: every RMSNorm scales by (1 + w) (`norm.offset=1.0`), the token
embeddings are multiplied by sqrt(hidden_size) (`topology.scale_embeddings`), and
head_dim is its own number (256, where hidden_size / heads is 192 in the 7B).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import Expresses, only
from ..mapping import ROPE_SPELLINGS, ModelType
from . import llama
from .common import GATED, PLAIN_MODEL, RMSNORM, activation, dense, family_guess, gqa, refuse, rope_position, topology

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
# attention_bias flag for q, k, v and o, no MLP bias, no window.
EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": {"rmsnorm": {**RMSNORM["rmsnorm"], "offset": only(1.0)}},
            "activation": GATED, "attention": gqa(), "ffn": dense(),
            "topology": {"decoder_only": topology(scale_embeddings=only(True))}},
    model=PLAIN_MODEL)

TYPES = (ModelType("gemma", "GemmaForCausalLM", overrides, hf_config, llama.tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
