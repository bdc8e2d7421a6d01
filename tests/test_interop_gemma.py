"""Hugging Face interop for Gemma (GemmaForCausalLM): the standard checks (hf_parity: logits
eager and compiled, round trips, greedy decoding), how its config reads (the norms' unit
offset, the scaled embeddings, the legacy activation names), the gemma_2b preset written as
its own type, and refusals that name the field."""

from __future__ import annotations

import pytest
import torch
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, pair, parity_tests

# Multi-query attention as in gemma-2b, and a head_dim (24) other than hidden / heads (16), as in gemma-7b.
GEMMA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=24,
             intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=64)

CASES = {"gemma": Case(lambda: transformers.GemmaConfig(**GEMMA), transformers.GemmaForCausalLM)}
globals().update(parity_tests(CASES))


def test_config_reads_as_gemma(tmp_path_factory):
    _, cfg, _ = pair(CASES, "gemma", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components == {"position": "rope", "norm": "rmsnorm", "activation": "geglu_tanh", "attention": "gqa",
                               "ffn": "dense", "topology": "decoder_only"}
    assert spec.params["norm"].offset == 1.0 and spec.params["topology"].scale_embeddings
    assert (spec.model.head_dim, spec.model.n_kv_heads, spec.model.tie_embeddings) == (24, 1, True)


def gemma_config(**changes):
    return {"model_type": "gemma", **GEMMA, **changes}


@pytest.mark.parametrize("hidden_act, hidden_activation", [("gelu", None), ("gelu", "gelu_pytorch_tanh"),
                                                           ("gelu_pytorch_tanh", None)])
def test_released_activation_names_read_as_the_tanh_gelu(hidden_act, hidden_activation):
    """The released configs say hidden_act "gelu" (and later hidden_activation "gelu_pytorch_tanh"):
    GemmaConfig computes the tanh GELU for both."""
    _, ours = config_overrides(gemma_config(hidden_act=hidden_act, hidden_activation=hidden_activation), MODEL_TYPES)
    assert "activation=geglu_tanh" in ours and not any(o == "activation=geglu" for o in ours)


@pytest.mark.parametrize("field, value", [("use_bidirectional_attention", True), ("hidden_activation", "silu")])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides(gemma_config(**{field: value}), MODEL_TYPES)
    assert info.value.key == field


@pytest.mark.parametrize("change, key", [
    ("norm.offset=0.0", "norm.offset"), ("topology.scale_embeddings=false", "topology.scale_embeddings"),
    ("attention.window=8", "attention.window"), ("attention.softcap=30.0", "attention.softcap"),
])
def test_to_hf_refuses_what_gemma_cannot_express(change, key, tmp_path):
    cfg = lc.compose(["model=gemma_2b", "scale=tiny", change])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="gemma")
    assert info.value.key == key and not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, key", [("norm.offset=1.0", "norm.offset"),
                                         ("topology.scale_embeddings=true", "topology.scale_embeddings")])
def test_llama_refuses_each_gemma_component(change, key, tmp_path):
    cfg = lc.compose(["model=tiny", change])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="llama")
    assert info.value.key == key


def test_preset_is_written_as_gemma():
    assert guess_type(lc.resolve_spec(lc.compose(["model=gemma_2b", "scale=tiny"]))) == "gemma"
