"""Hugging Face interop for mBART (MBartForConditionalGeneration): the standard checks
(hf_parity: logits eager and compiled, round trips, greedy decoding), how its config reads
(BART made pre-norm with a final LayerNorm on each stack, scaled token embeddings), the older
configs' mBART fields, and refusals that name the field."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB, max_position_embeddings=64,
             decoder_start_token_id=2)

CASES = {
    # mbart-large-cc25's choices: the token embeddings scaled by sqrt(d_model), GELU.
    "mbart": Case(config(transformers.MBartConfig, SMALL, scale_embedding=True), transformers.MBartForConditionalGeneration,
                  own_std={"shared": 0.05}, std=0.4),
    # Unscaled, ReLU.
    "mbart_relu": Case(config(transformers.MBartConfig, SMALL, activation_function="relu"),
                       transformers.MBartForConditionalGeneration, seed=2, std=0.4),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_mbart(tmp_path_factory):
    _, cfg, _ = pair(CASES, "mbart", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    topology = spec.params["topology"]
    assert spec.components["topology"] == "bart" and topology.norm_position == "pre"
    assert topology.scale_embeddings and topology.embedding_norm and topology.head_bias == "buffer"
    assert guess_type(spec) == "mbart"  # BART cannot express pre-norm


def test_older_configs_fields_read_at_mbarts_values():
    _, ours = config_overrides({"model_type": "mbart", **SMALL, "normalize_before": True, "add_final_layer_norm": True,
                                "normalize_embedding": True, "static_position_embeddings": False,
                                "add_bias_logits": False, "extra_pos_embeddings": 2}, MODEL_TYPES)
    assert "topology.norm_position=pre" in ours


@pytest.mark.parametrize("field, value", [("normalize_before", False), ("add_final_layer_norm", False),
                                          ("static_position_embeddings", True), ("tie_word_embeddings", False),
                                          ("decoder_layers", 3)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "mbart", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def test_to_hf_refuses_a_post_norm_bart_as_mbart(tmp_path):
    cfg = lc.compose(["model=bart_base", "scale=tiny"])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="mbart")
    assert info.value.key == "topology.norm_position" and not (tmp_path / "out").exists()
