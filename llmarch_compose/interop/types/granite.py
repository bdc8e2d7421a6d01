"""Granite (GraniteForCausalLM): LLaMA's block and checkpoint layout with four multipliers.

- `embedding_multiplier`: token embeddings times it (our `topology.embedding_multiplier`);
- `residual_multiplier`: each sublayer's output times it as it joins the residual stream
  (our `topology.residual_multiplier`);
- `attention_multiplier`: the attention scale itself, in place of 1 / sqrt(head_dim)
  (our `model.attention_scale`);
- `logits_scaling`: the LM head's logits divided by it (our `topology.logit_divisor`).

A multiplier of 1 reads as none. A model without any of them is LLaMA's, and is written
as llama unless granite is asked for (the families are tried alphabetically).
"""

from __future__ import annotations

from typing import Any, Mapping

from ..fit import ANY, Expresses, Rule
from ..mapping import ModelType, override
from . import llama
from .common import GATED, PLAIN_MODEL, RMSNORM, SPLIT_HEADS, dense, family_guess, gqa, rope_position, topology

DEFAULTS = {**llama.DEFAULTS["llama"], "rms_norm_eps": 1e-6, "embedding_multiplier": 1.0, "logits_scaling": 1.0,
            "residual_multiplier": 1.0, "attention_multiplier": 1.0}
del DEFAULTS["pretraining_tp"], DEFAULTS["head_dim"]
# Granite's multipliers and the topology options that hold them (1: none).
MULTIPLIERS = {"embedding_multiplier": "embedding_multiplier", "residual_multiplier": "residual_multiplier",
               "logits_scaling": "logit_divisor"}


def granite_overrides(hf: Mapping[str, Any]) -> list[str]:
    out = [*llama._overrides(hf, "granite"), override("model.attention_scale", float(hf["attention_multiplier"]))]
    for theirs, ours in MULTIPLIERS.items():
        value = float(hf[theirs])
        out.append(override(f"topology.{ours}", None if value == 1.0 else value))
    return out


def granite_config(spec: Any) -> dict[str, Any]:
    out = {k: v for k, v in llama.hf_config(spec).items() if k in TYPES[0].fields}
    scale, topo = spec.params["attention"].scale, spec.params["topology"]
    out["attention_multiplier"] = scale if scale is not None else spec.model.head_dim ** -0.5
    for theirs, ours in MULTIPLIERS.items():
        value = getattr(topo, ours)
        out[theirs] = 1.0 if value is None else value
    return out


def _granite(spec: Any) -> bool:
    topo = spec.params["topology"]
    return spec.params["attention"].scale is not None or any(getattr(topo, o) is not None
                                                              for o in MULTIPLIERS.values())


EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": RMSNORM, "activation": GATED, "attention": gqa(scale=ANY),
            "ffn": dense(bias=ANY),
            "topology": {"decoder_only": topology(**{ours: ANY for ours in MULTIPLIERS.values()})}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS},
    guess_rules=(Rule("topology.embedding_multiplier", lambda spec: None, _granite,
                      "one of Granite's multipliers, or model.attention_scale",
                      "none of Granite's multipliers (that model is LLaMA's, written as llama)"),))

TYPES = (ModelType("granite", "GraniteForCausalLM", granite_overrides, granite_config, llama.tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),)

guess = family_guess(TYPES)
