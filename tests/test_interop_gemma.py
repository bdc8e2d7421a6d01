"""Hugging Face interop for Gemma and Gemma-2 (GemmaForCausalLM, Gemma2ForCausalLM): the
standard checks (hf_parity: logits eager and compiled, round trips, greedy decoding), how
their configs read (the norms' unit offset, the scaled embeddings, the legacy activation
names; Gemma-2's sandwich norms, caps, query scale and sliding layers), the gemma_2b and
gemma2_9b presets written as their own types, and refusals that name the field."""

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

# Gemma-2: layer 0 sliding (a window of 8 on 24 tokens), layer 1 full; caps low enough to bite,
# a query scale of its own (query_pre_attn_scalar 20, head_dim 24).
GEMMA2 = dict(GEMMA, num_key_value_heads=2, sliding_window=8, query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
              final_logit_softcapping=5.0)

# Gemma-3: a sliding layer (window 8, RoPE base 10K) and a full one (base 1M, linear scaling by 8),
# per-head norms of queries and keys, no softcaps (Gemma3TextConfig's default).
GEMMA3 = dict(GEMMA, num_key_value_heads=2, num_hidden_layers=3, sliding_window=8, query_pre_attn_scalar=20,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}})

CASES = {"gemma": Case(lambda: transformers.GemmaConfig(**GEMMA), transformers.GemmaForCausalLM),
         # Greedy: a smaller token table, or the scaled embeddings steer every step to one repeated token.
         "gemma2": Case(lambda: transformers.Gemma2Config(**GEMMA2), transformers.Gemma2ForCausalLM,
                        own_std={"embed_tokens": 0.05}),
         "gemma3_text": Case(lambda: transformers.Gemma3TextConfig(**GEMMA3), transformers.Gemma3ForCausalLM,
                             own_std={"embed_tokens": 0.05})}
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


def refused_key(overrides: list[str], model_type: str, out) -> str:
    """The key to_hf names refusing the model `overrides` describe as `model_type`; nothing written."""
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, out, model_type=model_type)
    assert not out.exists()
    return info.value.key


@pytest.mark.parametrize("change, key", [
    ("norm.offset=0.0", "norm.offset"), ("topology.scale_embeddings=false", "topology.scale_embeddings"),
    ("attention.window=8", "attention.window"), ("attention.softcap=30.0", "attention.softcap"),
    ("activation=geglu", "activation.approximate"),  # GemmaConfig would read hidden_act gelu as the tanh GELU
])
def test_to_hf_refuses_what_gemma_cannot_express(change, key, tmp_path):
    assert refused_key(["model=gemma_2b", "scale=tiny", change], "gemma", tmp_path / "out") == key


@pytest.mark.parametrize("change, key", [("norm.offset=1.0", "norm.offset"),
                                         ("topology.scale_embeddings=true", "topology.scale_embeddings")])
def test_llama_refuses_each_gemma_component(change, key, tmp_path):
    assert refused_key(["model=tiny", change], "llama", tmp_path / "out") == key


def test_preset_is_written_as_gemma():
    assert guess_type(lc.resolve_spec(lc.compose(["model=gemma_2b", "scale=tiny"]))) == "gemma"


# ------------------------------------------------------------------ gemma2

def test_gemma2_config_reads_as_gemma2(tmp_path_factory):
    _, cfg, _ = pair(CASES, "gemma2", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    topology, attention = spec.params["topology"], spec.params["attention"]
    assert (topology.norm_position, topology.final_logit_softcap, topology.scale_embeddings) == ("sandwich", 5.0, True)
    assert (attention.softcap, attention.window, attention.scale) == (2.0, None, 20 ** -0.5)
    assert [spec.params_for("attention", i).window for i in range(2)] == [8, None]


def gemma2_config(**changes):
    return {"model_type": "gemma2", **GEMMA2, **changes}


@pytest.mark.parametrize("types, windows", [(["full_attention", "sliding_attention"], [None, 8]),
                                            (["sliding_attention"] * 2, [8, 8]),
                                            (["full_attention"] * 2, [None, None])])
def test_gemma2_layer_types_read_as_windows(types, windows):
    _, ours = config_overrides(gemma2_config(layer_types=types), MODEL_TYPES)
    spec = lc.resolve_spec(lc.compose(ours))
    assert [spec.params_for("attention", i).window for i in range(2)] == windows


@pytest.mark.parametrize("changes, key", [
    (dict(hidden_act="silu"), "hidden_act"), (dict(sliding_window_size=16), "sliding_window_size"),
    (dict(layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
])
def test_gemma2_fields_it_cannot_represent_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError) as info:
        config_overrides(gemma2_config(**changes), MODEL_TYPES)
    assert info.value.key == key


def test_gemma2_released_fields_that_agree_are_read():
    _, ours = config_overrides(gemma2_config(hidden_act="gelu_pytorch_tanh", sliding_window_size=8,
                                             cache_implementation="hybrid"), MODEL_TYPES)
    assert "activation=geglu_tanh" in ours


@pytest.mark.parametrize("change, key", [
    ("topology.norm_position=pre", "topology.norm_position"),
    ("model.layer_pattern=[{layers:[0],attention:{window:8}},{layers:[1],attention:{window:16}}]",
     "model.layer_pattern"),
    ("model.layer_pattern=[{layers:[0],attention:{softcap:3.0}}]", "model.layer_pattern"),
    ("model.attention_scale=0.3", "attention.scale"),
])
def test_to_hf_refuses_what_gemma2_cannot_express(change, key, tmp_path):
    assert refused_key(["model=gemma2_9b", "scale=tiny", change], "gemma2", tmp_path / "out") == key


@pytest.mark.parametrize("change, key", [("topology.norm_position=sandwich", "topology.norm_position"),
                                         ("topology.final_logit_softcap=30.0", "topology.final_logit_softcap")])
def test_other_types_refuse_gemma2_components(change, key, tmp_path):
    assert refused_key(["model=gemma_2b", "scale=tiny", change], "gemma", tmp_path / "out") == key


def test_gemma2_preset_is_written_as_gemma2():
    spec = lc.resolve_spec(lc.compose(["model=gemma2_9b", "scale=tiny"]))
    assert guess_type(spec) == "gemma2"
    assert [spec.params_for("attention", i).window is not None for i in range(4)] == [True, False, True, False]


# ------------------------------------------------------------------ gemma3 (text)

def test_gemma3_config_reads_with_a_rope_per_layer_type(tmp_path_factory):
    _, cfg, _ = pair(CASES, "gemma3_text", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.params["attention"].qk_norm and spec.params["topology"].final_logit_softcap is None
    assert [spec.params_for("attention", i).window for i in range(3)] == [8, None, 8]
    ropes = [(p.theta, p.scaling and (p.scaling.type, p.scaling.factor)) for p in
             (spec.params_for("position", i) for i in range(3))]
    assert ropes == [(1e4, None), (1e6, ("linear", 8.0)), (1e4, None)]


def gemma3_config(**changes):
    return {"model_type": "gemma3_text", **{k: v for k, v in GEMMA3.items() if k != "rope_parameters"}, **changes}


def test_gemma3_released_spelling_reads_as_transformers_reads_it():
    """rope_theta and rope_scaling are the global layers', rope_local_base_freq the local ones';
    sliding_window_pattern 6 makes every sixth layer global."""
    hf = gemma3_config(num_hidden_layers=7, layer_types=None, sliding_window_pattern=6, rope_theta=5e5,
                       rope_local_base_freq=2e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
    theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hf.items() if k != "model_type"})
    _, ours = config_overrides(hf, MODEL_TYPES)
    spec = lc.resolve_spec(lc.compose(ours))
    for i, kind in enumerate(theirs.layer_types):
        p, want = spec.params_for("position", i), theirs.rope_parameters[kind]
        assert (spec.params_for("attention", i).window is None) == (kind == "full_attention")
        assert p.theta == want["rope_theta"]
        assert (p.scaling.factor if p.scaling else None) == want.get("factor")


@pytest.mark.parametrize("changes, key", [
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(rope_parameters={"global": {"rope_theta": 1e6}}), "rope_parameters"),
    (dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6,
                                              "partial_rotary_factor": 0.5}}),
     "rope_parameters.full_attention.partial_rotary_factor"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(rope_parameters={"full_attention": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}}),
     "rope_parameters.full_attention.rope_type"),
])
def test_gemma3_fields_it_cannot_represent_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError) as info:
        config_overrides(gemma3_config(**changes), MODEL_TYPES)
    assert info.value.key == key


@pytest.mark.parametrize("change, key", [
    ("model.qk_norm=false", "attention.qk_norm"),
    ("model.layer_pattern=[{layers:[5],attention:{window:null},position:{theta:1.0e6}},"
     "{layers:[0],position:{theta:2.0e4}}]", "model.layer_pattern"),
])
def test_to_hf_refuses_what_gemma3_cannot_express(change, key, tmp_path):
    assert refused_key(["model=gemma3_4b", "scale=tiny", change], "gemma3_text", tmp_path / "out") == key


def test_gemma2_refuses_a_rope_per_layer(tmp_path):
    assert refused_key(["model=gemma2_9b", "scale=tiny", "model.layer_pattern=[{every:2,offset:0,"
                        "attention:{window:8},position:{theta:1.0e6}}]"], "gemma2", tmp_path / "out") \
        == "model.layer_pattern"


def test_gemma3_preset_is_written_as_gemma3_and_reads_back(tmp_path):
    spec = lc.resolve_spec(lc.compose(["model=gemma3_4b", "scale=tiny"]))
    assert guess_type(spec) == "gemma3_text"
    assert [spec.params_for("attention", i).window is None for i in range(6)] == [False] * 5 + [True]
    cfg = lc.compose(["model=gemma3_4b", "scale=tiny"])
    to_hf(lc.build(cfg), cfg, tmp_path / "out")
    import json
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    _, ours = config_overrides(written, MODEL_TYPES)
    back = lc.resolve_spec(lc.compose(ours))
    assert back.layer_params == spec.layer_params and back.params["position"] == spec.params["position"]
