"""Hugging Face interop for Falcon (FalconForCausalLM): the standard checks (hf_parity) for
its three block layouts, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import from_hf
from hf_parity import VOCAB, Case, build_hf, config, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
             max_position_embeddings=64)

CASES = {
    # Falcon-7B's block: parallel attention off one shared LayerNorm, multi-query, no biases, tied.
    "falcon": Case(config(transformers.FalconConfig, SMALL), transformers.FalconForCausalLM, seed=1),
    # Falcon-40B's: new_decoder_architecture, a LayerNorm per branch, 2 key/value groups, biases,
    # an untied head, ffn_hidden_size stated.
    "falcon_new_two_norms": Case(config(transformers.FalconConfig, SMALL, new_decoder_architecture=True,
                                        num_kv_heads=2, bias=True, tie_word_embeddings=False, ffn_hidden_size=96),
                                 transformers.FalconForCausalLM, seed=2),
    # The new architecture with one shared LayerNorm (num_ln_in_parallel_attn 1), multi-head.
    "falcon_new_one_norm": Case(config(transformers.FalconConfig, SMALL, new_decoder_architecture=True,
                                       num_ln_in_parallel_attn=1, num_kv_heads=4), transformers.FalconForCausalLM,
                                seed=3),
    # Falcon-RW's sequential block: multi-head attention (fused head by head), biases, tanh GELU.
    "falcon_sequential": Case(config(transformers.FalconConfig, SMALL, parallel_attn=False, multi_query=False,
                                     bias=True, activation="gelu_new"), transformers.FalconForCausalLM, seed=4),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def test_falcon_7b_layout_reads_as_a_shared_norm_with_one_key_value_head(tmp_path):
    cfg, model = from_hf(_saved("falcon", tmp_path, apply_residual_connection_post_layernorm=False))
    assert cfg.topology.parallel_residual is True and cfg.topology.shared_norm is True
    assert model.decoder.blocks[0].attn.n_kv_heads == 1 and model.decoder.blocks[0].ffn_norm is None


@pytest.mark.parametrize("name, changes, key", [
    ("falcon", dict(alibi=True), "alibi"),
    ("falcon", dict(apply_residual_connection_post_layernorm=True), "apply_residual_connection_post_layernorm"),
    ("falcon", dict(num_ln_in_parallel_attn=2), "num_ln_in_parallel_attn"),  # outside the new architecture
    ("falcon_sequential", dict(num_kv_heads=2), "num_kv_heads"),
    ("falcon_new_one_norm", dict(parallel_attn=False), "parallel_attn"),
    ("falcon", dict(activation="gelu_fast"), "activation"),
])
def test_unrepresentable_field_is_named(name, changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved(name, tmp_path, **changes))
    assert info.value.key == key


def test_groups_join_reorders_query_key_value_group_by_group():
    import torch

    from llmarch_compose.interop.hf import InteropError
    from llmarch_compose.interop.mapping import TensorRule, to_ours, to_theirs

    # 2 key/value groups of 2 query heads, 1 row per head: group 0 is q0 q1 k0 v0, group 1 q2 q3 k1 v1.
    rule = TensorRule("qkv", ("fused",), "groups", (2, 2, 1))
    fused = torch.arange(8.0).reshape(8, 1)
    ours, _ = to_ours({"fused": fused}, [rule], 0)
    assert ours["qkv"].flatten().tolist() == [0, 1, 4, 5, 2, 6, 3, 7]
    assert torch.equal(to_theirs(ours, [rule])["fused"], fused)
    bias = torch.arange(8.0)  # a bias (one dimension) reorders the same way
    assert to_ours({"fused": bias}, [rule], 0)[0]["qkv"].tolist() == [0, 1, 4, 5, 2, 6, 3, 7]
    # One group is multi-query's q|k|v as it stands; one query head per group is multi-head's head by head.
    one = TensorRule("qkv", ("fused",), "groups", (1, 3, 1))
    assert torch.equal(to_ours({"fused": fused[:5]}, [one], 0)[0]["qkv"], fused[:5])
    per_head = TensorRule("qkv", ("fused",), "groups", (2, 1, 1))
    heads = TensorRule("qkv", ("fused",), "heads", (2, 3))
    assert torch.equal(to_ours({"fused": fused[:6]}, [per_head], 0)[0]["qkv"],
                       to_ours({"fused": fused[:6]}, [heads], 0)[0]["qkv"])
    with pytest.raises(InteropError, match="qkv"):
        to_ours({"fused": torch.zeros(7, 1)}, [rule], 0)
