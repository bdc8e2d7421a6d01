"""Hugging Face interop for Granite (GraniteForCausalLM): the standard checks (hf_parity: logits
eager and compiled, round trips, greedy decoding) with its four multipliers read as topology
options and the attention scale, and a model without them written as llama."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.interop.types import guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64)

CASES = {
    # Granite-3's kind of numbers (embeddings x12, residual x0.22, logits / 8), scaled to a tiny model.
    "granite": Case(config(transformers.GraniteConfig, SMALL, num_key_value_heads=2, embedding_multiplier=3.0,
                           residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0),
                    transformers.GraniteForCausalLM),
    # Biases on attention and MLP, a tied head; the class's default multipliers (1: the scale is 1 too).
    "granite_bias_tied": Case(config(transformers.GraniteConfig, SMALL, attention_bias=True, mlp_bias=True,
                                     tie_word_embeddings=True), transformers.GraniteForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_multipliers_read_as_topology_options(tmp_path_factory):
    _, cfg, _ = pair(CASES, "granite", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    topo = spec.params["topology"]
    assert (topo.embedding_multiplier, topo.residual_multiplier, topo.logit_divisor) == (3.0, 0.5, 2.0)
    assert spec.params["attention"].scale == 0.3 and guess_type(spec) == "granite"
    _, cfg, _ = pair(CASES, "granite_bias_tied", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.params["topology"].embedding_multiplier is None and spec.params["attention"].scale == 1.0


@pytest.mark.parametrize("preset", ["llama2_7b", "llama3_8b", "mistral_7b", "qwen2_0_5b"])
def test_models_without_multipliers_stay_with_their_family(preset):
    spec = lc.resolve_spec(lc.compose([f"model={preset}", "scale=tiny"]))
    assert guess_type(spec) != "granite"
