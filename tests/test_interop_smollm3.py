"""Hugging Face interop for SmolLM3 (SmolLM3ForCausalLM): the standard checks (hf_parity: logits
eager and compiled, round trips, greedy decoding) with its NoPE layers read as a layer pattern
(`attention.rotary=false`), the smollm3_3b preset written as smollm3, and refusals by name."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)

CASES = {
    # The class's default: every 2nd layer without RoPE (interval 2 on 4 layers: layers 1 and 3), tied.
    "smollm3": Case(config(transformers.SmolLM3Config, SMALL, no_rope_layer_interval=2),
                    transformers.SmolLM3ForCausalLM),
    # An explicit list (layer 0 without RoPE), biases, an untied head.
    "smollm3_list_bias": Case(config(transformers.SmolLM3Config, SMALL, no_rope_layers=[0, 1, 1, 1],
                                     attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
                              transformers.SmolLM3ForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_nope_layers_read_as_a_layer_pattern(tmp_path_factory):
    _, cfg, ours = pair(CASES, "smollm3", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert [spec.params_for("attention", i).rotary for i in range(4)] == [True, False, True, False]
    assert [b.attn.rotary for b in ours.decoder.blocks] == [True, False, True, False]
    assert guess_type(spec) == "smollm3"


@pytest.mark.parametrize("field, value", [("no_rope_layers", [1, 1]), ("no_rope_layers", [1, 2, 1, 1]),
                                          ("no_rope_layer_interval", 0), ("use_sliding_window", True)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "smollm3", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def test_preset_is_written_as_smollm3():
    spec = lc.resolve_spec(lc.compose(["model=smollm3_3b", "scale=tiny"]))
    assert guess_type(spec) == "smollm3"
