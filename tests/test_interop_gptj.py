"""Hugging Face interop for GPT-J (GPTJForCausalLM): the standard checks (hf_parity) with
GPT-J's interleaved partial RoPE, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import from_hf
from hf_parity import VOCAB, Case, build_hf, config, parity_tests

SMALL = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)

CASES = {
    # GPT-J-6B's shape: 8 of each 16-wide head rotating in neighbouring pairs, the 4x MLP, an untied biased head.
    "gptj": Case(config(transformers.GPTJConfig, SMALL, rotary_dim=8), transformers.GPTJForCausalLM),
    # The whole head rotating, n_inner stated, exact GELU, a tied head (its bias of its own).
    "gptj_full_rotary_tied": Case(config(transformers.GPTJConfig, SMALL, rotary_dim=16, n_inner=96,
                                         activation_function="gelu", tie_word_embeddings=True),
                                  transformers.GPTJForCausalLM),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_gptj_reads_as_interleaved_partial_rope_and_a_shared_norm(tmp_path):
    cfg, model = from_hf(_saved("gptj", tmp_path))
    assert cfg.model.rope_interleaved is True and cfg.model.rotary_fraction == 0.5
    assert cfg.topology.shared_norm is True and model.decoder.blocks[0].ffn_norm is None


@pytest.mark.parametrize("changes, key", [
    (dict(rotary_dim=None), "rotary_dim"),
    (dict(activation_function="gelu_fast"), "activation_function"),
    (dict(rope_theta=500.0), "rope_theta"),  # GPT-J's tables ignore it: refused rather than dropped
])
def test_unrepresentable_field_is_named(changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved("gptj", tmp_path, **changes))
    assert info.value.key == key
