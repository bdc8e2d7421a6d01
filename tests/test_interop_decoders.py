"""Hugging Face interop for more decoder-only types built from the existing components:
qwen3, starcoder2, gpt_neox, gpt_bigcode, opt. The standard checks (hf_parity: logits eager
and compiled, round trips, greedy decoding), Pythia's spellings, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import transformers

from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import from_hf
from hf_parity import VOCAB, Case, build_hf, config, parity_tests

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
             max_position_embeddings=64)
SMALL_OPT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=96, vocab_size=VOCAB,
                 max_position_embeddings=64)
GPT2_LIKE = dict(n_embd=64, n_layer=2, n_head=4, n_inner=96, vocab_size=VOCAB, n_positions=64)


CASES = {
    # head_dim 32 (not 64 / 4), GQA, QK-norm, biases on all four projections, a tied head.
    "qwen3": Case(config(transformers.Qwen3Config, SMALL, num_key_value_heads=2, head_dim=32, attention_bias=True,
                         tie_word_embeddings=True), transformers.Qwen3ForCausalLM, seed=1),
    # GQA, a window of 8 (the 24-token input exceeds it), biases everywhere, tanh GELU, a tied head.
    "starcoder2": Case(config(transformers.Starcoder2Config, SMALL, num_key_value_heads=2, sliding_window=8),
                       transformers.Starcoder2ForCausalLM, seed=2),
    # Pythia's shape: parallel residual, a quarter of each head rotating (the config's default).
    "gpt_neox": Case(config(transformers.GPTNeoXConfig, SMALL), transformers.GPTNeoXForCausalLM, seed=2),
    # The sequential block, half of each head rotating, no attention biases, a tied head.
    "gpt_neox_sequential": Case(config(transformers.GPTNeoXConfig, SMALL, use_parallel_residual=False,
                                       rotary_pct=0.5, attention_bias=False, tie_word_embeddings=True),
                                transformers.GPTNeoXForCausalLM),
    # Multi-query attention (multi_query, the default): one key/value head, learned positions.
    "gpt_bigcode": Case(config(transformers.GPTBigCodeConfig, GPT2_LIKE), transformers.GPTBigCodeForCausalLM),
    # Multi-head attention (c_attn head by head), exact GELU, an untied head.
    "gpt_bigcode_mha": Case(config(transformers.GPTBigCodeConfig, GPT2_LIKE, multi_query=False,
                                   activation_function="gelu", tie_word_embeddings=False),
                            transformers.GPTBigCodeForCausalLM),
    # Pre-norm blocks (do_layer_norm_before), ReLU, biases, positions from row 2, a tied head.
    "opt": Case(config(transformers.OPTConfig, SMALL_OPT), transformers.OPTForCausalLM),
    # OPT-350m's post-norm blocks (no final norm), no biases, an untied head.
    "opt_post_norm": Case(config(transformers.OPTConfig, SMALL_OPT, do_layer_norm_before=False, enable_bias=False,
                                 tie_word_embeddings=False), transformers.OPTForCausalLM),
}
globals().update(parity_tests(CASES))


def _saved(name, tmp_path, **changes):
    folder = tmp_path / name
    build_hf(CASES[name]).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


@pytest.mark.parametrize("name, changes, key", [
    ("qwen3", dict(use_sliding_window=True), "use_sliding_window"),
    ("starcoder2", dict(hidden_act="gelu_fast"), "hidden_act"),
    # GPT-NeoX's config does not read the top-level spelling: refused rather than half-applied.
    ("gpt_neox", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("gpt_bigcode", dict(add_cross_attention=True), "add_cross_attention"),
    ("gpt_bigcode", dict(num_key_value_heads=2), "num_key_value_heads"),  # multi_query says 1
    ("opt", dict(word_embed_proj_dim=32), "word_embed_proj_dim"),  # OPT-350m's projected embeddings
    ("opt", dict(_remove_final_layer_norm=True), "_remove_final_layer_norm"),
])
def test_unrepresentable_field_is_named(name, changes, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        from_hf(_saved(name, tmp_path, **changes))
    assert info.value.key == key


def test_gpt_neox_as_pythia_writes_it(tmp_path):
    """Pythia's config.json spells RoPE rotary_pct / rotary_emb_base; the head may be named lm_head."""
    from safetensors.torch import load_file, save_file

    import torch
    from hf_parity import logits

    hf = build_hf(CASES["gpt_neox"])
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_parameters"]["partial_rotary_factor"] == 0.25
    config.pop("rope_parameters")
    (tmp_path / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.25, "rotary_emb_base": 10000}))
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("embed_out.weight")
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg, ours = from_hf(tmp_path)
    assert cfg.model.rotary_fraction == 0.25 and cfg.topology.parallel_residual is True
    torch.testing.assert_close(logits(ours.eval(), "causal"), logits(hf, "causal"), atol=1e-4, rtol=0)


def test_heads_join_regroups_and_names_a_bad_shape():
    """GPT-NeoX's q, k, v head by head <-> ours, part by part; rows that do not divide are named."""
    import torch

    from llmarch_compose.interop.hf import InteropError
    from llmarch_compose.interop.mapping import TensorRule, to_ours, to_theirs

    rule = TensorRule("qkv", ("fused",), "heads", (2, 3))  # 2 heads, q|k|v, 2 rows each
    fused = torch.arange(12.0).reshape(12, 1)  # head 0: q 0-1, k 2-3, v 4-5; head 1: q 6-7, k 8-9, v 10-11
    ours, _ = to_ours({"fused": fused}, [rule], 0)
    assert ours["qkv"].flatten().tolist() == [0, 1, 6, 7, 2, 3, 8, 9, 4, 5, 10, 11]
    assert torch.equal(to_theirs(ours, [rule])["fused"], fused)
    with pytest.raises(InteropError, match="qkv"):
        to_ours({"fused": torch.zeros(10, 1)}, [rule], 0)
