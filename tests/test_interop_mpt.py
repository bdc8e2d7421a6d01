"""Hugging Face interop for MPT (MptForCausalLM): the standard checks (hf_parity: logits eager
and compiled, round trips, greedy decoding), how its config reads (ALiBi with alibi_bias_max,
bias-free LayerNorms, no biases, the fused Wqkv), and refusals that name the field."""

from __future__ import annotations

import pytest
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, config, pair, parity_tests

SMALL = dict(d_model=64, n_heads=4, n_layers=2, vocab_size=VOCAB, max_seq_len=64)

CASES = {
    # mpt-7b's choices at small size: ALiBi to 2^-8, a tied head.
    "mpt": Case(config(transformers.MptConfig, SMALL), transformers.MptForCausalLM),
    # Six heads (MPT reorders the slopes of the next power of two: the paper's), a softmax scale of
    # its own, an untied head.
    "mpt_six_heads": Case(config(transformers.MptConfig, SMALL, d_model=48, n_heads=6, tie_word_embeddings=False,
                                 attn_config={"softmax_scale": 0.2}),
                          transformers.MptForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_mpt(tmp_path_factory):
    _, cfg, _ = pair(CASES, "mpt_six_heads", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components == {"position": "alibi", "norm": "layernorm", "activation": "gelu", "attention": "mha",
                               "ffn": "dense", "topology": "decoder_only"}
    assert not spec.params["norm"].bias
    assert spec.params["attention"].scale == 0.2 and not spec.model.tie_embeddings
    assert guess_type(spec) == "mpt"


@pytest.mark.parametrize("changes, key", [
    (dict(attn_config={"clip_qkv": 8.0}), "attn_config.clip_qkv"), (dict(attn_config={"qk_ln": True}), "attn_config.qk_ln"),
    (dict(attn_config={"prefix_lm": True}), "attn_config.prefix_lm"),
    (dict(attn_config={"attn_type": "multiquery_attention"}), "attn_config.attn_type"),
    (dict(attn_config={"alibi": False}), "attn_config.alibi"),
    (dict(attn_config={"alibi_bias_max": 4}), "attn_config.alibi_bias_max"), (dict(attn_config={"rope": True}), "attn_config.rope"),
    (dict(no_bias=False), "no_bias"), (dict(expansion_ratio=2), "expansion_ratio"),
    (dict(logit_scale=0.5), "logit_scale"), (dict(embedding_fraction=0.1), "embedding_fraction"),
])
def test_fields_it_cannot_represent_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "mpt", **SMALL, **changes}, MODEL_TYPES)
    assert info.value.key == key


@pytest.mark.parametrize("change, key", [("norm.bias=true", "norm.bias"), ("model.qkv_bias=true", "attention.qkv_bias")])
def test_to_hf_refuses_what_mpt_cannot_express(change, key, tmp_path):
    overrides = ["model=tiny", "position=alibi", "norm=layernorm", "norm.bias=false", "activation=gelu",
                 "model.n_kv_heads=4", "model.n_heads=4", "model.d_model=64", "model.ffn_dim=256", change]
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="mpt")
    assert info.value.key == key and not (tmp_path / "out").exists()
