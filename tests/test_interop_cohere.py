"""Hugging Face interop for Cohere (CohereForCausalLM): the standard checks (hf_parity) with
the shared bias-free LayerNorm, interleaved RoPE and the factor on the logits, and
refusals that name the field."""

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
    # Command-R's shape: 2 key/value groups, no biases, a tied head, logits times 0.0625 (the default).
    "cohere": Case(config(transformers.CohereConfig, SMALL, num_key_value_heads=2), transformers.CohereForCausalLM,
                   seed=1, std=0.5),
    # Multi-head attention with biases on q, k, v and o, an untied head, another factor and base.
    "cohere_biased_untied": Case(config(transformers.CohereConfig, SMALL, attention_bias=True,
                                        tie_word_embeddings=False, logit_scale=0.5, rope_theta=500.0),
                                 transformers.CohereForCausalLM, seed=2),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_cohere_reads_as_a_shared_bias_free_norm_and_scaled_logits(tmp_path):
    cfg, model = from_hf(_saved("cohere", tmp_path))
    assert cfg.topology.shared_norm is True and cfg.topology.logit_scale == 0.0625
    assert cfg.norm.bias is False and cfg.model.rope_interleaved is True
    assert model.decoder.blocks[0].ffn_norm is None and model.decoder.blocks[0].attn_norm.bias is None


@pytest.mark.parametrize("changes, key", [
    (dict(use_qk_norm=True), "use_qk_norm"),  # weights of its own per head
    (dict(logit_scale=None), "logit_scale"),
    (dict(hidden_act="gelu_fast"), "hidden_act"),
])
def test_unrepresentable_field_is_named(changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved("cohere", tmp_path, **changes))
    assert info.value.key == key


def test_a_config_without_rope_fields_has_coheres_base(tmp_path):
    folder = _saved("cohere", tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config))
    cfg, _ = from_hf(folder)
    assert cfg.model.rope_theta == 500000.0
