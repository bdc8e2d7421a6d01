"""Hugging Face interop for DeepSeek-V2 (DeepseekV2ForCausalLM): the standard checks
(hf_parity: logits eager and compiled, round trips, greedy decoding), how its config reads
(MLA with or without query compression, softmax-scored experts taken as they are and scaled,
shared experts, dense first layers, YaRN with DeepSeek's mscales), the deepseek_v2_lite preset
written as its own type, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
             kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)
YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
            beta_slow=1.0, mscale=0.707, mscale_all_dim=0.707)

CASES = {
    # DeepSeek-V2-Lite's shape: no query compression, one dense layer, two shared experts, greedy, YaRN.
    "deepseek_v2": Case(config(transformers.DeepseekV2Config, SMALL, q_lora_rank=None, first_k_dense_replace=1,
                               n_shared_experts=2, rope_parameters=YARN), transformers.DeepseekV2ForCausalLM),
    # Query compression, biases, scaled routing, groups that all stay, no dense layer, plain RoPE.
    "deepseek_v2_lora": Case(config(transformers.DeepseekV2Config, SMALL, num_hidden_layers=2, q_lora_rank=32,
                                    attention_bias=True, n_shared_experts=1, routed_scaling_factor=2.0,
                                    topk_method="group_limited_greedy", n_group=2, topk_group=2),
                             transformers.DeepseekV2ForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_deepseek_v2(tmp_path_factory):
    _, cfg, _ = pair(CASES, "deepseek_v2", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components == {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "attention": "mla",
                               "ffn": "moe", "topology": "decoder_only"}
    ffn = spec.params_for("ffn", 1)
    assert (ffn.router, ffn.normalize_top_k, ffn.shared_experts, ffn.n_groups) == ("softmax", False, 2, 1)
    assert spec.params_for("ffn", 0).plugin == "dense" and spec.params["position"].interleaved
    assert spec.params["attention"].dims(spec.model).q_lora is None


def test_the_preset_writes_as_deepseek_v2(tmp_path):
    cfg = lc.compose(["model=deepseek_v2_lite", "scale=tiny"])
    assert guess_type(lc.resolve_spec(cfg)) == "deepseek_v2"
    to_hf(lc.build(cfg), cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "deepseek_v2" and written["q_lora_rank"] is None
    assert written["topk_method"] == "greedy" and written["first_k_dense_replace"] == 1


def released(**changes):
    """deepseek-ai/DeepSeek-V2-Lite's config.json (less auto_map)."""
    return {"model_type": "deepseek_v2", "attention_bias": False, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
            "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
            "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
            "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
            "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
            "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
            "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128,
            "vocab_size": 102400, **changes}


def test_the_released_config_reads_as_the_preset():
    _, ours = config_overrides(released(), MODEL_TYPES)
    read = lc.resolve_spec(lc.compose(ours))
    want = lc.resolve_spec(lc.compose(["model=deepseek_v2_lite"]))
    assert read.params == want.params and read.model.n_layers == want.model.n_layers
    assert read.params_for("ffn", 0) == want.params_for("ffn", 0)


@pytest.mark.parametrize("changes, key", [
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=3), "topk_method"),
    (dict(topk_method="noaux_tc"), "topk_method"), (dict(norm_topk_prob=True), "norm_topk_prob"),
    (dict(scoring_func="sigmoid"), "scoring_func"), (dict(mlp_bias=True), "mlp_bias"),
    (dict(n_shared_experts=0), "n_shared_experts"), (dict(num_key_value_heads=4), "num_key_value_heads"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
])
def test_fields_it_cannot_represent_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError) as info:
        config_overrides(released(**changes), MODEL_TYPES)
    assert info.value.key == key


@pytest.mark.parametrize("change, key", [("ffn.normalize_top_k=true", "ffn.normalize_top_k"),
                                         ("position.interleaved=false", "position.interleaved")])
def test_to_hf_refuses_what_deepseek_v2_cannot_express(change, key, tmp_path):
    cfg = lc.compose(["model=deepseek_v2_lite", "scale=tiny", change])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="deepseek_v2")
    assert info.value.key == key and not (tmp_path / "out").exists()
