"""Hugging Face interop for Marian (MarianMTModel): the standard checks (hf_parity: logits
eager and compiled, round trips), how its config reads (BART's post-norm stacks with fixed
sinusoidal positions in halves, no norm on the embeddings, scaled token embeddings, the
final_logits_bias buffer), and refusals that name the field."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=1,
             decoder_start_token_id=1)

# The greedy check is off: on these tiny random Marian models transformers' own greedy path repeats
# one token from the first step (every seed and weight scale tried), which proves nothing; the
# logits, compiled logits and round trips are checked.
CASES = {
    # opus-mt's choices: the token embeddings scaled by sqrt(d_model), swish.
    "marian": Case(config(transformers.MarianConfig, SMALL, scale_embedding=True, activation_function="swish"),
                   transformers.MarianMTModel, own_std={"shared": 0.05}, decode=False),
    # Unscaled, GELU.
    "marian_gelu": Case(config(transformers.MarianConfig, SMALL), transformers.MarianMTModel, seed=1, decode=False),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_marian(tmp_path_factory):
    _, cfg, _ = pair(CASES, "marian", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    topology = spec.params["topology"]
    assert spec.components["position"] == "sinusoidal" and spec.params["position"].layout == "halves"
    assert topology.norm_position == "post" and topology.scale_embeddings and not topology.embedding_norm
    assert spec.components["activation"] == "silu" and guess_type(spec) == "marian"


@pytest.mark.parametrize("field, value", [("share_encoder_decoder_embeddings", False), ("decoder_vocab_size", 100),
                                          ("tie_word_embeddings", False), ("decoder_layers", 3)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "marian", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def test_to_hf_refuses_interleaved_positions(tmp_path):
    _, ours = config_overrides({"model_type": "marian", **SMALL}, MODEL_TYPES)
    cfg = lc.compose([*ours, "position.layout=interleaved"])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="marian")
    assert info.value.key == "position.layout" and not (tmp_path / "out").exists()
