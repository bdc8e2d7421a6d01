"""Hugging Face interop for glm4 (Glm4ForCausalLM, GLM-4-0414): the standard checks (hf_parity:
logits eager and compiled, round trips, greedy decoding), how its config reads (glm's partial
interleaved rotary and q/k/v biases, with sandwich norms), and what the neighbouring glm type refuses."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)

CASES = {
    # GQA, half of each head rotating in interleaved pairs (the default), biases on q, k and v.
    "glm4": Case(config(transformers.Glm4Config, SMALL), transformers.Glm4ForCausalLM, seed=1),
    # No attention biases, a quarter of each head rotating, a tied head.
    "glm4_tied": Case(config(transformers.Glm4Config, SMALL, attention_bias=False, partial_rotary_factor=0.25,
                             tie_word_embeddings=True), transformers.Glm4ForCausalLM, seed=4),
}
globals().update(parity_tests(CASES))


def test_glm4_config_reads_as_glm_with_sandwich_norms(tmp_path_factory):
    _, cfg, _ = pair(CASES, "glm4", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.params["topology"].norm_position == "sandwich"
    assert spec.params["position"].fraction == 0.5 and spec.params["position"].interleaved
    assert spec.params["attention"].qkv_bias and not spec.params["attention"].out_bias
    assert guess_type(spec) == "glm4"


def refused_key(overrides, model_type, out):
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, out, model_type=model_type)
    return info.value.key


def test_glm_and_glm4_refuse_each_others_norm_placement(tmp_path):
    glm = ["model=chatglm3_6b", "scale=tiny", "model.rope_interleaved=true", "topology.residual=standard"]
    assert refused_key([*glm, "topology.norm_position=sandwich"], "glm", tmp_path / "a") == "topology.norm_position"
    assert refused_key(glm, "glm4", tmp_path / "b") == "topology.norm_position"


def test_glm4_refuses_a_window():
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "glm4", **SMALL, "sliding_window": 16}, MODEL_TYPES)
    assert info.value.key == "sliding_window"
