"""Hugging Face interop for Phi (PhiForCausalLM): the standard checks (hf_parity), the
rotating share a config.json leaves out (PhiConfig's 0.5), and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import from_hf
from hf_parity import VOCAB, Case, build_hf, config, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64)

CASES = {
    # Phi-2's shape: one shared LayerNorm, part of each head rotating (6 of 16), tanh GELU, an untied biased head.
    "phi": Case(config(transformers.PhiConfig, SMALL, partial_rotary_factor=0.375), transformers.PhiForCausalLM,
                seed=1),
    # Grouped key/value heads, a LayerNorm on queries and keys, exact GELU, half rotating, a tied head.
    "phi_gqa_qk_norm": Case(config(transformers.PhiConfig, SMALL, num_key_value_heads=2, qk_layernorm=True,
                                   hidden_act="gelu", tie_word_embeddings=True, rope_theta=500.0),
                            transformers.PhiForCausalLM, seed=2),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, drop=(), **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_a_config_without_rope_fields_rotates_half_of_each_head(tmp_path):
    """PhiConfig defaults the rotating share to 0.5: a config.json stating neither spelling means that."""
    cfg, _ = from_hf(_saved("phi", tmp_path, drop=("rope_parameters", "partial_rotary_factor")))
    assert cfg.model.rotary_fraction == 0.5 and cfg.model.rope_theta == 10000.0
    assert cfg.topology.parallel_residual is True and cfg.topology.shared_norm is True
    cfg, _ = from_hf(_saved("phi", tmp_path / "legacy", drop=("rope_parameters",), partial_rotary_factor=0.25,
                            rope_theta=100.0))
    assert cfg.model.rotary_fraction == 0.25 and cfg.model.rope_theta == 100.0


@pytest.mark.parametrize("changes, key", [
    (dict(hidden_act="gelu_fast"), "hidden_act"),
    (dict(head_dim=8), "head_dim"),  # not a field of PhiConfig
])
def test_unrepresentable_field_is_named(changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved("phi", tmp_path, **changes))
    assert info.value.key == key
