"""Hugging Face interop for BLOOM (BloomForCausalLM): the standard checks (hf_parity: logits
eager and compiled, round trips, greedy decoding), how its config reads (ALiBi, the norm on
the embeddings, the fused query_key_value head by head, the released spellings), and
refusals that name the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import config_overrides, from_hf, to_hf
from llmarch_compose.interop.types import MODEL_TYPES
from hf_parity import VOCAB, Case, build_hf, config, pair, parity_tests

SMALL = dict(hidden_size=64, n_layer=2, n_head=4, vocab_size=VOCAB)

CASES = {
    # Four heads (powers of two), a tied head. Greedy decoding on the tied head repeats a few tokens
    # whatever the seed (the head reads back the embeddings' own tokens): the untied case decodes.
    "bloom": Case(config(transformers.BloomConfig, SMALL), transformers.BloomForCausalLM, decode=False),
    # Six heads (ALiBi's slopes for a head count that is not a power of two), an untied head.
    "bloom_six_heads": Case(config(transformers.BloomConfig, SMALL, hidden_size=48, n_head=6,
                                   tie_word_embeddings=False), transformers.BloomForCausalLM, seed=1),
}
globals().update(parity_tests(CASES))


def test_config_reads_as_bloom(tmp_path_factory):
    _, cfg, _ = pair(CASES, "bloom", tmp_path_factory)
    spec = lc.resolve_spec(cfg)
    assert spec.components == {"position": "alibi", "norm": "layernorm", "activation": "gelu_tanh",
                               "attention": "mha", "ffn": "dense", "topology": "decoder_only"}
    assert spec.params["topology"].embedding_norm and spec.model.tie_embeddings and spec.model.ffn_dim == 256


def test_a_released_checkpoint_without_the_prefix_reads(tmp_path):
    """bigscience's uploads store word_embeddings.weight, h.0..., ln_f without `transformer.`,
    and say n_embed and the Megatron switches."""
    hf = build_hf(CASES["bloom"])
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embed"] = config.pop("hidden_size")
    config.update(attention_softmax_in_fp32=True, masked_softmax_fusion=True, offset_alibi=100, n_inner=None,
                  skip_bias_add=True, unk_token_id=0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, ours = from_hf(tmp_path)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("field, value", [("apply_residual_connection_post_layernorm", True), ("n_inner", 96)])
def test_fields_it_cannot_represent_are_refused_by_name(field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": "bloom", **SMALL, field: value}, MODEL_TYPES)
    assert info.value.key == field


@pytest.mark.parametrize("change, key", [("topology.embedding_norm=false", "topology.embedding_norm"),
                                         ("model.ffn_dim=96", "ffn.hidden")])
def test_to_hf_refuses_what_bloom_cannot_express(change, key, tmp_path):
    overrides = ["model=tiny", "position=alibi", "norm=layernorm", "activation=gelu_tanh", "model.n_kv_heads=4",
                 "model.n_heads=4", "model.d_model=64", "model.ffn_dim=256", "model.attention_bias=true",
                 "model.qkv_bias=true", "model.mlp_bias=true", "topology.embedding_norm=true", change]
    cfg = lc.compose(overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="bloom")
    assert info.value.key == key and not (tmp_path / "out").exists()
