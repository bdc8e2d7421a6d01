"""Hugging Face interop for Phi-3 (Phi3ForCausalLM, also Phi-4's class): the standard checks
(hf_parity: logits eager and compiled, round trips, greedy decoding), the fused qkv_proj and
gate_up_proj read as our fused tensors, the phi3_mini and phi4 presets written as phi3, and
refusals that name the field (LongRoPE, biases)."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64, original_max_position_embeddings=64, pad_token_id=0, eos_token_id=2,
             bos_token_id=1)

CASES = {
    # Phi-3-mini's shape: multi-head attention and a window (8, on the 24-token input) on every layer.
    "phi3": Case(config(transformers.Phi3Config, SMALL, sliding_window=8), transformers.Phi3ForCausalLM),
    # Phi-4's: GQA, no window; half of each head rotating.
    "phi3_gqa_partial": Case(config(transformers.Phi3Config, SMALL, num_key_value_heads=2,
                                    rope_parameters={"rope_type": "default", "rope_theta": 250000.0,
                                                     "partial_rotary_factor": 0.5}),
                             transformers.Phi3ForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_phi3(tmp_path_factory):
    _, cfg, _ = pair(CASES, "phi3", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components["attention"] == "swa" and spec.params["attention"].window == 8
    _, cfg, _ = pair(CASES, "phi3_gqa_partial", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.params["position"].fraction == 0.5 and spec.params["position"].theta == 250000.0
    assert spec.params["attention"].num_kv_heads == 2 and spec.params["attention"].window is None


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}


@pytest.mark.parametrize("field, value", [
    ("rope_scaling", LONGROPE), ("rope_scaling", {"type": "su", **LONGROPE}),
    ("rope_scaling", {"type": "yarn", "factor": 2.0}),  # Phi3Config reads yarn as LongRoPE too
    ("rope_parameters", {**LONGROPE, "rope_theta": 10000.0}),
    ("attention_bias", True), ("head_dim", 32), ("mlp_bias", True),
])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "phi3", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def refused_key(overrides: list[str], out) -> str:
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, out, model_type="phi3")
    assert not out.exists()
    return info.value.key


@pytest.mark.parametrize("change, key", [
    ("model.attention_bias=true", "attention.qkv_bias"), ("model.mlp_bias=true", "ffn.bias"),
    ("model.rope_scaling={type:linear,factor:2.0}", "position.scaling.type"), ("model.qk_norm=true", "attention.qk_norm"),
])
def test_to_hf_refuses_what_phi3_cannot_express(change, key, tmp_path):
    assert refused_key(["model=phi3_mini", "scale=tiny", change], tmp_path / "out") == key


@pytest.mark.parametrize("preset, first", [("phi3_mini", "mistral"), ("phi4", "llama")])
def test_presets_fit_phi3_and_keep_the_earlier_families_first(preset, first):
    """Phi-3 computes what LLaMA (no window) and Mistral (a window on every layer) compute, with
    fused tensors: without a model type the presets are written as those earlier families; as
    phi3 when asked."""
    from llmarch_compose.interop.fit import problems

    spec = lc.resolve_spec(lc.compose([f"model={preset}", "scale=tiny"]))
    assert guess_type(spec) == first
    assert not problems(spec, MODEL_TYPES["phi3"].expresses, "phi3")
