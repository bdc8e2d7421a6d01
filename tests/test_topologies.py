"""Topologies, per-layer patterns and scale=tiny, checked by what each must and must
not see (perturbation tests) and by hand-wired references."""

from __future__ import annotations

import math

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError, UnknownKeyError
from llmarch_compose.config.layer_patterns import LAYER_GROUPS
from llmarch_compose.model.card import count_params

from conftest import TINY


def build(*overrides: str, dtype=torch.float64):
    torch.manual_seed(0)
    model = lc.build(lc.compose([*TINY, *overrides])).to(dtype)
    for p in model.parameters():  # large enough weights that every path visibly matters
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def changed_positions(fn, ids: torch.Tensor, at: int) -> torch.Tensor:
    """Which output positions change when the token at `at` changes."""
    other = ids.clone()
    other[:, at] = (other[:, at] + 1) % 128
    with torch.no_grad():
        return (fn(ids) - fn(other)).abs().amax(dim=(0, 2)) > 1e-9


IDS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def test_decoder_only_is_causal():
    model = build()
    seen = changed_positions(lambda x: model(x).logits, IDS, at=4)
    assert seen.tolist() == [False] * 4 + [True] * 6


@pytest.mark.parametrize("prefix", [0, 3, 6])
def test_prefix_decoder_sees_its_prefix_both_ways(prefix):
    model = build("topology=prefix_decoder")
    fn = lambda x: model(x, prefix_len=torch.tensor([prefix, prefix])).logits  # noqa: E731
    # A token inside the prefix is seen by every position, earlier ones included.
    if prefix:
        assert changed_positions(fn, IDS, at=prefix - 1).all()
    # A token after the prefix is seen only from its own position on.
    seen = changed_positions(fn, IDS, at=prefix + 2)
    assert seen.tolist() == [False] * (prefix + 2) + [True] * (10 - prefix - 2)


def test_prefix_lengths_differ_per_sequence():
    model = build("topology=prefix_decoder")
    with torch.no_grad():
        both = model(IDS, prefix_len=torch.tensor([2, 7])).logits
        first = model(IDS[:1], prefix_len=torch.tensor([2])).logits
        second = model(IDS[1:], prefix_len=torch.tensor([7])).logits
    torch.testing.assert_close(both, torch.cat((first, second)))


def test_prefix_len_is_refused_by_a_causal_decoder():
    with pytest.raises(ValueError, match="prefix_decoder"):
        build()(IDS, prefix_len=torch.tensor([2, 2]))


def test_encoder_only_is_bidirectional_and_predicts_every_position():
    model = build("topology=encoder_only", "position=learned", "model.type_vocab_size=2")
    assert model.objective is lc.MASKED_LM
    assert changed_positions(lambda x: model(x).logits, IDS, at=9).all()
    with torch.no_grad():
        plain = model(IDS).logits
        typed = model(IDS, token_type_ids=torch.ones_like(IDS)).logits
    assert not torch.allclose(plain, typed)  # token types reach the output


def test_encoder_decoder_decoder_is_causal_and_reads_the_whole_source():
    model = build("topology=t5", "position=relative_bias", "model.tie_embeddings=true")
    target = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    from_source = changed_positions(lambda s: model(s, target).logits, IDS, at=9)
    assert from_source.all()  # the last source token reaches the first target position
    from_target = changed_positions(lambda t: model(IDS, t).logits, target, at=3)
    assert from_target.tolist() == [False] * 3 + [True] * 3


def test_encoder_decoder_stacks_keep_their_own_position_tables():
    model = build("topology=t5", "position=relative_bias")
    tables = [m for m in model.modules() if type(m).__name__ == "RelativePositionBias"]
    assert len(tables) == 2 and tables[0] is model.encoder_position and tables[1] is model.position
    # One table per stack (computed once per forward), none in the blocks: 2 x buckets x heads.
    card = count_params(model)
    bias_params = sum(p.numel() for t in tables for p in t.parameters())
    assert bias_params == 2 * 32 * 4
    assert card["params_total"] == sum(p.numel() for p in model.parameters())


def test_t5_head_is_scaled_when_tied():
    tied = build("topology=t5", "model.tie_embeddings=true")
    assert tied.head.scale == pytest.approx(64 ** -0.5)
    assert build("topology=t5", "model.tie_embeddings=false").head.scale is None


def test_bart_head_bias_is_a_buffer_and_embeddings_are_normalized():
    model = build("topology=bart", "position=learned", "norm=layernorm")
    assert "head.bias" in dict(model.named_buffers())
    assert "head.bias" not in dict(model.named_parameters())
    assert model.embed.norm is not None and model.encoder_embed.norm is not model.embed.norm
    assert model.embed.tokens is model.encoder_embed.tokens  # one shared table


def test_shared_layers_run_one_block_n_times():
    shared = build("topology=encoder_only", "topology.share_layers=true", "model.n_layers=3")
    assert len(shared.encoder.blocks) == 1 and shared.encoder.repeats == 3
    # Running the one block three times by hand gives the same output.
    positions = torch.arange(10)
    with torch.no_grad():
        x = shared.embed(IDS, positions)
        pos = shared.position.attention_inputs(positions)
        for _ in range(3):
            x, _ = shared.encoder.blocks[0](x, pos)
        torch.testing.assert_close(shared.head(shared.encoder.final_norm(x)), shared(IDS).logits)


def test_factorized_embeddings_project_to_the_model_width():
    model = build("topology=encoder_only", "model.embedding_dim=16", "model.tie_embeddings=true")
    assert model.embed.tokens.weight.shape == (128, 16)
    assert model.embed.project.weight.shape == (64, 16)
    assert model.head.transform[0].out_features == 16  # the MLM transform maps back to 16 for the tied head


def test_glm_residual_matches_a_hand_wired_block():
    model = build("topology=glm", "position=rope_2d", "norm=layernorm")
    block = model.decoder.blocks[0]
    alpha = math.sqrt(2 * 2)
    positions = torch.arange(10)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    pos = model.position.attention_inputs(positions)
    with torch.no_grad():
        h = block.attn_norm(x)
        h2 = h * alpha + block.attn(h, pos)
        m = block.ffn_norm(h2)
        want = m * alpha + block.ffn(m).output
        torch.testing.assert_close(block(x, pos)[0], want)


def test_shared_norm_drops_the_ffn_norm_and_refuses_cross_attention():
    two = build("topology.parallel_residual=true", "norm=layernorm")
    one = build("topology.parallel_residual=true", "topology.shared_norm=true", "norm=layernorm")
    assert one.decoder.blocks[0].ffn_norm is None
    size = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert size(two) - size(one) == 2 * 2 * 64  # per layer: a LayerNorm's weight and bias
    for topology in ("encoder_decoder", "t5", "bart"):  # refused before anything is built
        with pytest.raises(ConfigError) as info:
            lc.resolve_spec(lc.compose([*TINY, f"topology={topology}", "topology.parallel_residual=true",
                                        "topology.shared_norm=true"]))
        assert info.value.key == "topology.parallel_residual"


def test_shared_norm_decodes_as_it_runs_whole():
    model = build("topology.parallel_residual=true", "topology.shared_norm=true")
    with torch.no_grad():
        whole = model(IDS).logits.argmax(-1)
    out = lc.generate(model, IDS[:, :6], 4, eos_token_id=-1)  # no end token
    assert out.shape == (2, 10)
    with torch.no_grad():
        again = model(out).logits.argmax(-1)
    assert torch.equal(out[:, 6:], again[:, 5:9])


def test_normalized_head_uses_unit_rows():
    model = build("topology.normalize_head=true", "model.tie_embeddings=false")
    with torch.no_grad():
        model.head.weight.mul_(torch.arange(1, 129, dtype=torch.float64)[:, None])  # rescaling rows changes nothing
        a = model(IDS).logits
        model.head.weight.div_(torch.arange(1, 129, dtype=torch.float64)[:, None])
        torch.testing.assert_close(a, model(IDS).logits)


# ------------------------------------------------------------------ layer patterns

def spec_of(*overrides: str):
    return lc.resolve_spec(lc.compose([*TINY, "model.n_layers=6", *overrides]))


def test_every_other_layer_gets_a_window():
    spec = spec_of("model.layer_pattern=[{every:2,offset:1,attention:{window:4}}]")
    windows = [spec.params_for("attention", i).window for i in range(6)]
    assert windows == [None, 4, None, 4, None, 4]
    model = lc.build(spec)
    assert [b.attn.window for b in model.decoder.blocks] == windows


def test_moe_from_layer_k_on_with_a_dense_start():
    spec = spec_of("ffn=moe", "model.layer_pattern=[{stop:2,ffn:dense}]")
    assert [spec.plugin("ffn", i).name for i in range(6)] == ["dense"] * 2 + ["moe"] * 4


def test_rules_combine_selectors_and_apply_in_order():
    spec = spec_of("model.layer_pattern=[{start:1,stop:5,every:2,offset:0,ffn:moe},{layers:[4],ffn:{hidden:32}}]")
    assert [spec.params_for("ffn", i).plugin for i in range(6)] == ["dense", "dense", "moe", "dense", "moe", "dense"]
    # The second rule changes layer 4's node, which the first made a MoE layer.
    assert spec.params_for("ffn", 4).hidden == 32 and spec.params_for("ffn", 4).plugin == "moe"


def test_stack_selector_limits_a_rule_to_one_stack():
    spec = spec_of("topology=t5", "model.layer_pattern=[{stack:encoder,attention:{window:3}}]")
    assert spec.params_for("attention", 0, "encoder").window == 3
    assert spec.params_for("attention", 0, "decoder").window is None


def test_pattern_layers_are_validated_before_building():
    with pytest.raises(ConfigError) as info:
        spec_of("ffn=moe", "model.layer_pattern=[{layers:[1],ffn:{top_k:99}}]")
    assert info.value.key == "model.layer_pattern[0].ffn.top_k"


@pytest.mark.parametrize("pattern, key", [
    ("[{every:0,ffn:dense}]", "model.layer_pattern[0].every"),
    ("[{every:2,offset:2,ffn:dense}]", "model.layer_pattern[0].offset"),
    ("[{stack:middle,ffn:dense}]", "model.layer_pattern[0].stack"),
    ("[{every:2}]", "model.layer_pattern[0]"),
    ("[{evry:2,ffn:dense}]", "model.layer_pattern[0].evry"),
    ("[{every:2,ffn:dnse}]", "ffn"),
])
def test_bad_patterns_name_the_rule(pattern, key):
    with pytest.raises(ConfigError) as info:
        spec_of(f"model.layer_pattern={pattern}")
    assert info.value.key == key
    if key.endswith("evry"):
        assert isinstance(info.value, UnknownKeyError) and "model.layer_pattern[0].every" in str(info.value)


def test_shared_layers_refuse_a_pattern():
    with pytest.raises(ConfigError, match="share_layers"):
        spec_of("topology.share_layers=true", "model.layer_pattern=[{every:2,ffn:moe}]")


# ------------------------------------------------------------------ per-layer position params

GLOBAL_ROPE = "model.layer_pattern=[{every:3,offset:2,position:{theta:1.0e6,scaling:{type:linear,factor:8.0}}}]"


def naive_per_layer_rope(model, ids, thetas, factors):
    """A pre-norm decoder recomputed with reference attention, each layer rotating with
    theta[i] ** (-2j/d) / factor[i] (the norms and FFNs are the model's own, tested elsewhere)."""
    import reference as ref
    m = model.spec.model
    positions = torch.arange(ids.shape[-1])
    x = model.embed.tokens.weight[ids]
    for block, theta, factor in zip(model.decoder.blocks, thetas, factors):
        inv_freq = ref.rope_inv_freq(theta, m.head_dim) / factor

        def rotate(t, inv_freq=inv_freq):
            return ref.rope_rotate(t, positions, inv_freq, m.head_dim, False)

        a = block.attn
        x = x + ref.attention(block.attn_norm(x), a.qkv.weight, a.qkv.bias, a.out.weight, a.out.bias,
                              m.n_heads, a.n_kv_heads, m.head_dim, causal=True, window=None, rotate=rotate)
        x = x + block.ffn(block.ffn_norm(x)).output
    return model.decoder.final_norm(x) @ model.embed.tokens.weight.T


def test_a_rule_gives_layers_a_rope_base_and_scaling_of_their_own():
    spec = spec_of(GLOBAL_ROPE)
    assert [spec.params_for("position", i).theta for i in range(6)] == [10000.0] * 2 + [1.0e6] + [10000.0] * 2 + [1.0e6]
    assert spec.params_for("position", 5).scaling.factor == 8.0 and spec.params_for("position", 0).scaling is None
    model = lc.build(spec)
    # One module for the two global layers, rotating with their params; the others use the stack's.
    assert len(model.decoder.layer_positions) == 1 and model.decoder.position_index == [0, 0, 1, 0, 0, 1]
    assert model.decoder.blocks[5].attn.rotate.__self__ is model.decoder.layer_positions[0]
    assert model.decoder.blocks[0].attn.rotate.__self__ is model.position


def test_per_layer_rope_matches_a_naive_reference_and_decodes():
    model = build("model.n_layers=3", GLOBAL_ROPE.replace("every:3,offset:2", "layers:[1]"))
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(ids).logits
        want = naive_per_layer_rope(model, ids, [1e4, 1e6, 1e4], [1.0, 8.0, 1.0])
        # Within the float32 angles RoPE computes (the reference's are float64).
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        # The model-wide base everywhere is another model: the rule is used.
        assert (got - naive_per_layer_rope(model, ids, [1e4] * 3, [1.0] * 3)).abs().max() > 1e-3
        state = model.new_decode_state(2, 9)
        parts = [model.decode_step(ids[:, :4], state, all_logits=True).logits]
        parts += [model.decode_step(ids[:, i:i + 1], state, all_logits=True).logits for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, dim=1), got, rtol=1e-5, atol=1e-5)  # as without a rule


@pytest.mark.parametrize("overrides, key", [
    (["model.layer_pattern=[{layers:[1],position:{thetaa:1.0}}]"], "position.thetaa"),  # as for any group
    (["model.layer_pattern=[{layers:[1],position:{theta:-1.0}}]"], "model.layer_pattern[0].position.theta"),
    (["model.layer_pattern=[{layers:[9],position:{theta:1.0e6}}]"], "model.layer_pattern[0]"),
    (["model.layer_pattern=[{layers:[1],position:alibi}]"], "model.layer_pattern[0].position.plugin"),
    (["position=alibi", "model.layer_pattern=[{layers:[1],position:{plugin:alibi}}]"],
     "model.layer_pattern[0].position"),
])
def test_bad_per_layer_positions_are_refused_by_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        spec_of(*overrides)
    assert info.value.key == key


# ------------------------------------------------------------------ scale=tiny

@pytest.mark.parametrize("fraction, head_dim, kept", [(0.25, 16, 0.25), (0.4, 16, 0.375), (0.5, 16, 0.5),
                                                      (1.0, 16, 1.0), (0.05, 16, 0.125), (0.95, 16, 0.875)])
def test_tiny_keeps_partial_rotary_on_an_even_number_of_dimensions(fraction, head_dim, kept):
    from llmarch_compose.config.scale import rotary_fraction

    assert rotary_fraction(fraction, head_dim) == kept
    spec = lc.resolve_spec(lc.compose(["model=phi2", "scale=tiny"]))
    assert spec.params["position"].fraction == 0.375  # Phi-2's 32 of 80 as 6 of 16


@pytest.mark.parametrize("preset, heads, kv", [("llama2_7b", 4, 4), ("llama2_70b", 4, 2), ("chatglm3_6b", 4, 2)])
def test_tiny_keeps_the_attention_kind(preset, heads, kv):
    spec = lc.resolve_spec(lc.compose([f"model={preset}", "scale=tiny"]))
    assert spec.model.n_heads == heads and spec.params["attention"].num_kv_heads == kv


def test_tiny_keeps_factorized_embeddings_and_mqa():
    albert = lc.resolve_spec(lc.compose(["model=albert_base", "scale=tiny"]))
    assert albert.model.embedding_dim == 32
    assert lc.resolve_spec(lc.compose(["model=llama2_7b", "scale=tiny"])).model.embedding_dim is None
    mqa = lc.resolve_spec(lc.compose(["model=llama2_70b", "attention=mqa", "scale=tiny"]))
    assert mqa.params["attention"].num_kv_heads == 1


def test_tiny_is_tunable_and_group_overrides_survive():
    spec = lc.resolve_spec(lc.compose(["model=llama3_8b", "scale=tiny", "scale.d_model=128", "scale.n_layers=2",
                                       "attention.num_kv_heads=1"]))
    assert spec.model.d_model == 128 and spec.model.n_layers == 2
    assert spec.params["attention"].num_kv_heads == 1
    assert spec.model.name == "llama3_8b@tiny"


def test_full_scale_changes_nothing():
    cfg = lc.compose(["model=llama3_8b"])
    assert lc.resolve_spec(cfg).model.d_model == 4096


def test_per_layer_groups_are_the_ones_the_docs_name():
    assert LAYER_GROUPS == ("attention", "ffn", "norm", "position")


# ------------------------------------------------------------------ ModernBERT's topology options

def test_first_layer_without_attention_norm_matches_a_hand_wiring():
    model = build("topology=encoder_only", "topology.norm_position=pre", "topology.first_attn_norm=false",
                  "topology.mlm_transform_bias=false", "position=rope")
    assert isinstance(model.encoder.blocks[0].attn_norm, torch.nn.Identity)
    assert not isinstance(model.encoder.blocks[1].attn_norm, torch.nn.Identity)
    assert model.head.transform[0].bias is None
    positions = torch.arange(IDS.shape[-1])
    with torch.no_grad():
        x = model.embed.norm(model.embed.tokens.weight[IDS])
        pos = model.position.attention_inputs(positions)
        for i, block in enumerate(model.encoder.blocks):
            x = x + block.attn(x if i == 0 else block.attn_norm(x), pos)
            x = x + block.ffn(block.ffn_norm(x)).output
        h = model.head.transform(model.encoder.final_norm(x))
        want = h @ model.embed.tokens.weight.T + model.head.bias
        torch.testing.assert_close(model(IDS).logits, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("overrides, key", [
    (["topology=encoder_only", "topology.first_attn_norm=false"], "topology.first_attn_norm"),  # post-norm
    (["topology.mlm_transform_bias=false"], "topology.mlm_transform_bias"),
    (["topology.first_attn_norm=false", "topology.share_layers=true"], "topology.first_attn_norm"),
])
def test_modernbert_options_are_refused_where_they_mean_nothing(overrides, key):
    with pytest.raises(ConfigError) as info:
        spec_of(*overrides)
    assert info.value.key == key
