"""Hugging Face interop for gpt-oss (GptOssForCausalLM): the standard checks (hf_parity:
logits eager and compiled, round trips, greedy decoding), how its config reads (sinks,
alternating sliding layers, the clamped SwiGLU, the biased experts stored fused with gate and
up alternating, YaRN without rounding), the gpt_oss_20b preset written as its own type, and
refusals that name the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, from_hf, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, build_hf, config, pair, parity_tests

# GQA, head_dim 16, 4 experts of which 2 per token, layer 0 sliding (a window of 8 on 24
# tokens) and layer 1 full (GptOssConfig's default layer_types), GptOssConfig's default YaRN.
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB,
             max_position_embeddings=64, sliding_window=8)

CASES = {
    # A low swiglu_limit so that both clamps (gate from above, up both ways) take part.
    "gpt_oss": Case(config(transformers.GptOssConfig, SMALL, swiglu_limit=0.1), transformers.GptOssForCausalLM),
    # Every layer full, no attention biases, plain RoPE, the default limit, a tied head.
    "gpt_oss_full": Case(config(transformers.GptOssConfig, SMALL, layer_types=["full_attention"] * 2,
                                attention_bias=False, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                         transformers.GptOssForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_gpt_oss(tmp_path_factory):
    _, cfg, _ = pair(CASES, "gpt_oss", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components == {"position": "rope", "norm": "rmsnorm", "activation": "swiglu_clamped",
                               "attention": "gqa", "ffn": "gpt_oss_moe", "topology": "decoder_only"}
    attention, ffn = spec.params["attention"], spec.params["ffn"]
    assert attention.sinks and attention.qkv_bias and attention.out_bias and attention.window is None
    assert spec.params_for("attention", 0).window == 8 and spec.params_for("attention", 1).window is None
    assert ffn.expert_bias and ffn.router_bias and ffn.normalize_top_k and ffn.shared_experts == 0
    assert spec.params["activation"].limit == 0.1
    s = spec.params["position"].scaling
    assert (s.type, s.factor, s.original_max_seq_len, s.truncate) == ("yarn", 32.0, 4096, False)
    assert spec.params["position"].theta == 150000.0


def test_experts_read_gate_and_up_apart(tmp_path_factory):
    """gate_up_proj alternates gate and up column by column: ours holds [gate | up]."""
    hf, _, ours = pair(CASES, "gpt_oss", tmp_path_factory)
    fused = hf.model.layers[0].mlp.experts.gate_up_proj
    w_in = ours.decoder.blocks[0].ffn.w_in
    torch.testing.assert_close(w_in[..., :48], fused[..., 0::2], atol=0, rtol=0)
    torch.testing.assert_close(w_in[..., 48:], fused[..., 1::2], atol=0, rtol=0)


def preset(tmp_path, name="gpt_oss_20b"):
    cfg = lc.compose([f"model={name}", "scale=tiny"])
    assert guess_type(lc.resolve_spec(cfg)) == "gpt_oss"
    to_hf(lc.build(cfg), cfg, tmp_path / "out")
    return json.loads((tmp_path / "out" / "config.json").read_text())


def test_the_preset_writes_as_gpt_oss(tmp_path):
    written = preset(tmp_path)
    assert written["model_type"] == "gpt_oss" and written["architectures"] == ["GptOssForCausalLM"]
    assert written["layer_types"][:2] == ["sliding_attention", "full_attention"]
    assert written["rope_scaling"]["truncate"] is False


def gpt_oss_config(**changes):
    return {"model_type": "gpt_oss", **SMALL, **changes}


@pytest.mark.parametrize("field, value", [
    ("experts_per_token", 3), ("layer_types", ["sliding_attention"]), ("quantization_config", {"quant_method": "mxfp4"}),
    ("sliding_window", None)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides(gpt_oss_config(**{field: value}), MODEL_TYPES)
    assert info.value.key == field


def test_the_released_config_reads():
    """openai/gpt-oss-20b's config.json fields (less the quantization): what its preset says."""
    released = dict(attention_bias=True, eos_token_id=200002, experts_per_token=4, head_dim=64, hidden_act="silu",
                    hidden_size=2880, initial_context_length=4096, intermediate_size=2880,
                    layer_types=["sliding_attention", "full_attention"] * 12, max_position_embeddings=131072,
                    model_type="gpt_oss", num_attention_heads=64, num_experts_per_tok=4, num_hidden_layers=24,
                    num_key_value_heads=8, num_local_experts=32, pad_token_id=199999, rms_norm_eps=1e-05,
                    rope_scaling={"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                  "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
                    rope_theta=150000, router_aux_loss_coef=0.9, sliding_window=128, swiglu_limit=7.0,
                    tie_word_embeddings=False, vocab_size=201088)
    _, ours = config_overrides(released, MODEL_TYPES)
    read = lc.resolve_spec(lc.compose(ours))
    want = lc.resolve_spec(lc.compose(["model=gpt_oss_20b"]))
    assert read.model.n_layers == want.model.n_layers and read.params == want.params
    assert [read.params_for("attention", i) for i in range(24)] == [want.params_for("attention", i)
                                                                    for i in range(24)]


@pytest.mark.parametrize("change, key", [
    ("attention.sinks=false", "attention.sinks"), ("ffn.expert_bias=false", "ffn.expert_bias"),
    ("attention.qkv_bias=false", "attention.qkv_bias"), ("model.layer_pattern=[{layers:[0],attention:{window:4}},"
                                          "{layers:[2],attention:{window:8}}]", "model.layer_pattern"),
])
def test_to_hf_refuses_what_gpt_oss_cannot_express(change, key, tmp_path):
    cfg = lc.compose(["model=gpt_oss_20b", "scale=tiny", change])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="gpt_oss")
    assert info.value.key == key and not (tmp_path / "out").exists()
