"""Differential attention against a naive reference of the paper's formula, the
checks of llmarch_compose.testing, its errors and its cost hooks."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llmarch_compose import ConfigError, PositionInputs, build, compose, resolve_spec
from llmarch_compose.model.card import architecture_card
from llmarch_compose.testing import TINY_MODEL, build_with, check_plugin
from llmarch_extras.differential import DifferentialAttention

# 4 differential heads sharing 2 KV heads: queries of one group must meet their group's keys.
HEADS = ["model.n_heads=8", "model.n_kv_heads=4"]


def naive_differential(attn: DifferentialAttention, x: torch.Tensor, pos: PositionInputs,
                       causal: bool, prefix_len=None) -> torch.Tensor:
    """The paper's formula head by head: (softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))) V,
    RMSNorm over the head, times (1 - lambda_init), then the output projection."""
    b, t, _ = x.shape
    h, hkv, d = attn.n_heads, attn.n_kv_heads, attn.head_dim
    w = attn.qkv.weight
    q = (x @ w[: 2 * h * d].T).view(b, t, 2 * h, d).transpose(1, 2)
    k = (x @ w[2 * h * d: 2 * h * d + 2 * hkv * d].T).view(b, t, 2 * hkv, d).transpose(1, 2)
    v = (x @ w[2 * h * d + 2 * hkv * d:].T).view(b, t, hkv, 2 * d)
    q, k = attn.rotate(q, k, pos)  # the position plugin's hook (identity for position=none)
    lam = (math.exp(float(attn.lambda_q1 @ attn.lambda_k1)) - math.exp(float(attn.lambda_q2 @ attn.lambda_k2))
           + float(attn.lambda_init))
    i = torch.arange(t)
    rows = []
    for bi in range(b):
        allowed = (i[None, :] <= i[:, None]) if causal else torch.ones(t, t, dtype=torch.bool)
        if prefix_len is not None:
            allowed = allowed | (i[None, :] < int(prefix_len[bi]))
        heads = []
        for head in range(h):
            g = head // (h // hkv)

            def softmax_map(half):
                scores = q[bi, half * h + head] @ k[bi, half * hkv + g].T / math.sqrt(d)
                return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)

            o = (softmax_map(0) - lam * softmax_map(1)) @ v[bi, :, g]
            norm = attn.head_norm
            o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight
            heads.append(o * (1 - float(attn.lambda_init)))
        rows.append(torch.cat(heads, dim=-1))
    return torch.stack(rows) @ attn.out.weight.T


@pytest.mark.parametrize("topology, position, prefix", [
    ("decoder_only", "rope", None),
    ("decoder_only", "none", None),
    ("encoder_only", "rope", None),
    ("prefix_decoder", "rope", [3, 6]),
])
def test_matches_naive_reference(topology, position, prefix):
    pm = build_with("attention", "differential", [*HEADS, f"topology={topology}", f"position={position}"])
    attn = pm.instances[1]  # the second layer: lambda_init from the depth schedule
    assert float(attn.lambda_init) == pytest.approx(0.8 - 0.6 * math.exp(-0.3 * 1))
    assert attn.causal == (topology != "encoder_only")
    with torch.no_grad():  # lambda away from its init, so a wrong sign or pairing shows
        for p in (attn.lambda_q1, attn.lambda_k1, attn.lambda_q2, attn.lambda_k2):
            p.copy_(torch.randn_like(p) * 0.5)
        attn.head_norm.weight.copy_(torch.rand_like(attn.head_norm.weight) + 0.5)
    x = torch.randn(2, 9, 32)
    positions = torch.arange(9)
    prefix_len = torch.tensor(prefix) if prefix else None
    position_module = pm.model.position
    pos = position_module.attention_inputs(positions, prefix_len)._replace(positions=positions)
    with torch.no_grad():
        got = attn(x, pos)
        want = naive_differential(attn, x, pos, attn.causal, prefix_len)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_plugin_checks_pass():
    """Shapes, gradients, causality, and fullgraph compilation (regional and whole) against eager."""
    report = check_plugin("attention", "differential", HEADS)
    assert report.checks == ["shapes", "gradients", "causal", "compiled (regional)", "compiled (whole)"]


@pytest.mark.parametrize("overrides", [["topology=encoder_only"], ["topology=prefix_decoder"]])
def test_plugin_checks_pass_in_other_topologies(overrides):
    check_plugin("attention", "differential", overrides, compiled=False)


def test_yaml_variant_is_differential_with_one_kv_pair():
    cfg = compose([*TINY_MODEL, "attention=differential_mqa"])
    spec = resolve_spec(cfg)
    assert spec.components["attention"] == "differential_mqa"
    assert spec.plugin("attention").cls is DifferentialAttention
    assert spec.params["attention"].num_kv_heads == 2
    check_plugin("attention", "differential_mqa", compiled=False)


@pytest.mark.parametrize("overrides, key, text", [
    (["attention.window=16"], "attention.window", "no sliding window"),
    (["attention.num_kv_heads=1"], "attention.num_kv_heads", "must be even"),
    (["model.n_kv_heads=3", "model.n_heads=6", "model.d_model=48"], "model.n_kv_heads", "must be even"),
    (["model.n_heads=3", "model.n_kv_heads=1", "model.d_model=48"], "model.n_heads", "pairs the query heads"),
    (["attention.lambda_init=1.0"], "attention.lambda_init", "[0, 1)"),
    (["position=alibi"], "position", "bias"),
    (["topology=encoder_decoder"], "attention", "cross-attention"),
])
def test_unsupported_settings_fail_by_name(overrides, key, text):
    with pytest.raises(ConfigError) as info:
        build(compose([*TINY_MODEL, "attention=differential", *overrides]), device="meta")
    assert info.value.key == key and text in str(info.value)


def test_kv_cache_hook_counts_the_projected_keys_and_values():
    pm = build_with("attention", "differential", HEADS)
    attn = pm.instances[0]
    m = resolve_spec(pm.cfg).model
    kv_width = attn.qkv.out_features - m.n_heads * m.head_dim  # the columns that make K and V
    assert attn.kv_cache_bytes_per_token(2) == 2 * kv_width
    card = architecture_card(resolve_spec(pm.cfg), dtype="bfloat16")
    assert card["kv_cache_bytes_per_token"] == m.n_layers * 2 * kv_width


def test_score_flops_hook_matches_counted_flops():
    """Bidirectional (every query sees every key), where the FLOP counter's SDPA count is exact."""
    pm = build_with("attention", "differential", [*HEADS, "topology=encoder_only", "position=none"])
    attn = pm.instances[0]
    b, t = 2, 10
    x = torch.randn(b, t, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        attn(x, PositionInputs())
    projections = 2 * b * t * (attn.qkv.in_features * attn.qkv.out_features
                               + attn.out.in_features * attn.out.out_features)
    sdpa = counter.get_total_flops() - projections
    assert sdpa > 0
    assert attn.score_flops_per_token(t) == pytest.approx(sdpa / (b * t))
