"""Hugging Face interop for StableLM (StableLmForCausalLM): the standard checks (hf_parity)
for its sequential and shared-norm parallel blocks, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import from_hf
from hf_parity import VOCAB, Case, build_hf, config, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64, num_key_value_heads=4)

CASES = {
    # StableLM-3B-4E1T's block: sequential, a quarter of each head rotating (the default), SwiGLU.
    "stablelm": Case(config(transformers.StableLmConfig, SMALL), transformers.StableLmForCausalLM, seed=1),
    # StableLM-2-12B's: the parallel residual off one norm, q/k/v biases, 2 key/value heads, half rotating, tied.
    "stablelm_parallel": Case(config(transformers.StableLmConfig, SMALL, use_parallel_residual=True,
                                     use_qkv_bias=True, num_key_value_heads=2, partial_rotary_factor=0.5,
                                     tie_word_embeddings=True), transformers.StableLmForCausalLM, seed=2),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, drop=(), **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_config_without_rope_fields_rotates_a_quarter_of_each_head(tmp_path):
    cfg, model = from_hf(_saved("stablelm_parallel", tmp_path, drop=("rope_parameters", "partial_rotary_factor")))
    assert cfg.model.rotary_fraction == 0.25
    assert cfg.topology.shared_norm is True and model.decoder.blocks[0].ffn_norm is None


@pytest.mark.parametrize("changes, key", [
    (dict(qk_layernorm=True), "qk_layernorm"),  # one LayerNorm per head
    (dict(hidden_act="gelu_fast"), "hidden_act"),
])
def test_unrepresentable_field_is_named(changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved("stablelm", tmp_path, **changes))
    assert info.value.key == key
