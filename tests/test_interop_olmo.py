"""Hugging Face interop for OLMo and OLMo-2 (OlmoForCausalLM, Olmo2ForCausalLM): the standard
checks (hf_parity: logits eager and compiled, round trips, greedy decoding), how their configs
read (OLMo-1's norms without parameters; OLMo-2's norms on the sublayer outputs and its QK-norm
over the whole projection), the olmo_7b and olmo2_7b presets written as their own types, and
refusals that name the field."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64, pad_token_id=1, eos_token_id=2)

CASES = {
    # Multi-head attention as in OLMo-7B, an untied head.
    "olmo": Case(config(transformers.OlmoConfig, SMALL), transformers.OlmoForCausalLM),
    # GQA and biases on all four projections, a tied head.
    "olmo_gqa_bias": Case(config(transformers.OlmoConfig, SMALL, num_key_value_heads=2, attention_bias=True,
                                 tie_word_embeddings=True), transformers.OlmoForCausalLM, seed=1),
    # GQA (the whole-projection k_norm is n_kv_heads * head_dim wide), an untied head.
    "olmo2": Case(config(transformers.Olmo2Config, SMALL, num_key_value_heads=2, rms_norm_eps=1e-6),
                  transformers.Olmo2ForCausalLM, seed=2),
}
globals().update(parity_tests(CASES))


def test_configs_read_as_olmo(tmp_path_factory):
    _, cfg, ours = pair(CASES, "olmo", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components["norm"] == "layernorm" and spec.components["attention"] == "gqa"
    norm = spec.params["norm"]
    assert (norm.affine, norm.bias, norm.eps) == (False, False, 1e-5)
    assert not [n for n, _ in ours.named_parameters() if "norm" in n]
    _, cfg, ours = pair(CASES, "olmo2", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    attention = spec.params["attention"]
    assert spec.params["topology"].norm_position == "post_output" and spec.params["norm"].eps == 1e-6
    assert (attention.qk_norm, attention.qk_norm_scope) == (True, "whole")
    assert ours.decoder.blocks[0].attn.k_norm.weight.shape == (2 * 16,)


@pytest.mark.parametrize("name, field, value", [("olmo", "clip_qkv", 8.0), ("olmo2", "clip_qkv", 8.0),
                                                ("olmo", "rms_norm_eps", 1e-6), ("olmo2", "pretraining_tp", 2)])
def test_fields_it_cannot_represent_are_refused_by_name(name, field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": name, **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def refused_key(overrides: list[str], model_type: str, out) -> str:
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, out, model_type=model_type)
    assert not out.exists()
    return info.value.key


@pytest.mark.parametrize("preset, change, model_type, key", [
    ("olmo_7b", "norm.eps=1e-6", "olmo", "norm.eps"),  # OlmoLayerNorm's epsilon is fixed
    ("olmo_7b", "norm.affine=true", "olmo", "norm.affine"),
    ("olmo_7b", "model.mlp_bias=true", "olmo", "ffn.bias"),
    ("olmo2_7b", "model.qk_norm_scope=per_head", "olmo2", "attention.qk_norm_scope"),
    ("olmo2_7b", "topology.norm_position=sandwich", "olmo2", "topology.norm_position"),
    ("olmo2_7b", "model.qkv_bias=true", "olmo2", "attention.qkv_bias"),
])
def test_to_hf_refuses_what_olmo_cannot_express(preset, change, model_type, key, tmp_path):
    assert refused_key([f"model={preset}", "scale=tiny", change], model_type, tmp_path / "out") == key


@pytest.mark.parametrize("preset, model_type", [("olmo_7b", "olmo"), ("olmo2_7b", "olmo2")])
def test_presets_are_written_as_their_type(preset, model_type):
    assert guess_type(lc.resolve_spec(lc.compose([f"model={preset}", "scale=tiny"]))) == model_type
