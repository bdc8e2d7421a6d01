"""Hugging Face interop for mT5 (MT5ForConditionalGeneration): the standard checks (hf_parity:
logits eager and compiled, round trips), how its config reads (T5 v1.1's gated tanh-GELU, a
head of its own never scaled), the mt5_base preset, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from torch import nn

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(d_model=64, d_kv=8, d_ff=96, num_layers=2, num_heads=4, vocab_size=VOCAB,
             relative_attention_num_buckets=16, relative_attention_max_distance=20)


def own_head(model: nn.Module) -> None:
    """transformers 5 ties every mT5 head; the released checkpoints store a head of their own."""
    model.lm_head.weight = nn.Parameter(torch.empty(model.config.vocab_size, model.config.d_model))


CASES = {
    # mT5's gated tanh-GELU, d_kv * heads != d_model, sources longer than max_distance.
    "mt5": Case(config(transformers.MT5Config, SMALL), transformers.MT5ForConditionalGeneration,
                prepare=own_head),
    # A plain ReLU feed-forward, the config's other spelling.
    "mt5_relu": Case(config(transformers.MT5Config, SMALL, feed_forward_proj="relu"),
                     transformers.MT5ForConditionalGeneration, prepare=own_head, seed=2, std=0.4),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_mt5(tmp_path_factory):
    _, cfg, _ = pair(CASES, "mt5", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components["topology"] == "t5" and spec.components["activation"] == "geglu_tanh"
    assert not spec.model.tie_embeddings and not spec.params["topology"].scale_tied_head
    assert spec.model.head_dim == 8 and spec.model.name == "hf:mt5"


def test_the_preset_is_t5_v1_1_with_a_larger_vocabulary(tmp_path):
    """mt5_base computes what a Flan-T5 of its sizes does: written as t5 when no type is named, and as
    mt5 when named, which reads back the same."""
    cfg = lc.compose(["model=mt5_base", "scale=tiny"])
    assert guess_type(lc.resolve_spec(cfg)) == "t5"
    model = lc.build(cfg)
    to_hf(model, cfg, tmp_path / "out", model_type="mt5")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "mt5" and "scale_decoder_outputs" not in written
    assert written["feed_forward_proj"] == "gated-gelu"


@pytest.mark.parametrize("field, value", [("num_decoder_layers", 3), ("feed_forward_proj", "gated-swish-x"),
                                          ("tie_encoder_decoder", True)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "mt5", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


def test_to_hf_refuses_a_scaled_head(tmp_path):
    cfg = lc.compose(["model=t5_small", "scale=tiny"])  # v1.0: tied and scaled
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="mt5")
    assert info.value.key == "topology.scale_tied_head" and not (tmp_path / "out").exists()
