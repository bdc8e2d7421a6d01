"""Hugging Face interop for ModernBERT (ModernBertForMaskedLM): the standard checks (hf_parity:
logits eager and compiled, round trips), how its config reads (the pre-norm encoder without a
norm before the first attention, the symmetric local window, a RoPE base per layer type, the
unbiased MLM transform), the modernbert_base preset written as it, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

# Layer 0 global (every 3rd from the first), layers 1 and 2 local with a window of +-4 on 24 tokens.
SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64, local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             cls_token_id=1, sep_token_id=2)

CASES = {
    "modernbert": Case(config(transformers.ModernBertConfig, SMALL), transformers.ModernBertForMaskedLM),
    # Biases everywhere (norms, projections, the MLM transform), no decoder bias, the tanh GELU,
    # a RoPE base of its own for each layer type, an untied decoder.
    "modernbert_biased": Case(config(transformers.ModernBertConfig, SMALL, norm_bias=True, attention_bias=True,
                                     mlp_bias=True, classifier_bias=True, decoder_bias=False,
                                     hidden_activation="gelu_pytorch_tanh",
                                     classifier_activation="gelu_pytorch_tanh", tie_word_embeddings=False,
                                     rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 5e4},
                                                      "sliding_attention": {"rope_type": "default",
                                                                            "rope_theta": 2e3}}),
                              transformers.ModernBertForMaskedLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_modernbert_config_reads_as_a_pre_norm_encoder_with_local_layers(tmp_path_factory):
    _, cfg, _ = pair(CASES, "modernbert", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    topology = spec.params["topology"]
    assert (topology.norm_position, topology.first_attn_norm, topology.mlm_transform_bias) == ("pre", False, False)
    # |query - key| <= local_attention // 2 = 4: fewer than 5 positions away.
    assert [spec.params_for("attention", i, "encoder").window for i in range(3)] == [None, 5, 5]
    assert [spec.params_for("position", i, "encoder").theta for i in range(3)] == [160_000.0, 1e4, 1e4]
    assert guess_type(spec) == "modernbert"


def modernbert_config(**changes):
    return {"model_type": "modernbert", **SMALL, **changes}


def test_released_spelling_reads_as_transformers_reads_it():
    hf = modernbert_config(num_hidden_layers=5, global_attn_every_n_layers=2, global_rope_theta=8e4,
                           local_rope_theta=3e3)
    theirs = transformers.ModernBertConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    _, ours = config_overrides(hf, MODEL_TYPES)
    spec = lc.resolve_spec(lc.compose(ours))
    for i, kind in enumerate(theirs.layer_types):
        assert (spec.params_for("attention", i, "encoder").window is None) == (kind == "full_attention")
        assert spec.params_for("position", i, "encoder").theta == theirs.rope_parameters[kind]["rope_theta"]


@pytest.mark.parametrize("changes, key", [
    (dict(classifier_activation="silu"), "classifier_activation"),
    (dict(layer_types=["full_attention", "chunked_attention", "full_attention"]), "layer_types"),
    (dict(rope_parameters={"global": {"rope_theta": 1e4}}), "rope_parameters"),
    (dict(hidden_activation="quick_gelu", classifier_activation="quick_gelu"), "hidden_activation"),
])
def test_fields_it_cannot_represent_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError) as info:
        config_overrides(modernbert_config(**changes), MODEL_TYPES)
    assert info.value.key == key


def refused_key(overrides, out):
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, out, model_type="modernbert")
    return info.value.key


@pytest.mark.parametrize("change, key", [
    ("topology.first_attn_norm=true", "topology.first_attn_norm"),
    ("topology.norm_position=post topology.first_attn_norm=true", "topology.norm_position"),
    ("model.layer_pattern=[{every:3,offset:0,attention:{window:null},position:{theta:1.0e5}},"
     "{layers:[1],position:{theta:2.0e4}}]", "model.layer_pattern"),
])
def test_to_hf_refuses_what_modernbert_cannot_express(change, key, tmp_path):
    assert refused_key(["model=modernbert_base", "scale=tiny", *change.split()], tmp_path / "out") == key


def test_modernbert_preset_is_written_as_modernbert_and_reads_back(tmp_path):
    spec = lc.resolve_spec(lc.compose(["model=modernbert_base", "scale=tiny"]))
    assert guess_type(spec) == "modernbert"
    cfg = lc.compose(["model=modernbert_base", "scale=tiny"])
    to_hf(lc.build(cfg), cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    _, ours = config_overrides(written, MODEL_TYPES)
    back = lc.resolve_spec(lc.compose(ours))
    assert back.layer_params == spec.layer_params and back.params["position"] == spec.params["position"]
