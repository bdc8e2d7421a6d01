"""The score-bias and 2D rotary position plugins: T5's relative bias, ALiBi and GLM's rope_2d.

Each is compared with transformers' own implementation where one exists (T5's
`compute_bias`, BLOOM's ALiBi slopes) and with a naive reference written from the
paper's or the model's description: Python loops over heads and positions, complex
multiplication for rotations (tests/reference.py). Comparisons run in float64 with
tolerance 1e-10 unless a table is computed in float32 by design. Every plugin also
builds into a tiny model that trains and compiles to one graph.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import llmarch_compose as lc
import reference as ref
from conftest import TINY
from llmarch_compose import ConfigError
from llmarch_compose.plugin import registry as plugins
from llmarch_compose.registry.position.alibi import alibi_slopes
from llmarch_compose.registry.position.relative_bias import relative_position_bucket

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)


def make_ctx(*overrides: str) -> lc.BuildContext:
    return lc.BuildContext(lc.resolve_spec(lc.compose([*TINY, *overrides])))


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.25) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype) * std)
    return module


def compare_forward_backward(actual, expected, inputs, params: dict[str, torch.Tensor]):
    """actual(*inputs) against expected(*inputs, cloned params), and the gradients of a random
    projection of the output with respect to every input and every parameter."""
    xa = [x.detach().clone().requires_grad_() for x in inputs]
    xr = [x.detach().clone().requires_grad_() for x in inputs]
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    out, want = actual(*xa), expected(*xr, ref_params)
    torch.testing.assert_close(out, want, **TIGHT)
    g = randn(*out.shape, seed=99)
    names = [f"input {i}" for i in range(len(xa))] + list(params)
    got = torch.autograd.grad(out, [*xa, *params.values()], g)
    wanted = torch.autograd.grad(want, [*xr, *ref_params.values()], g)
    for name, a, e in zip(names, got, wanted):
        assert e.abs().max() > 0, f"the gradient of {name} is zero: the test proves nothing"
        torch.testing.assert_close(a, e, **TIGHT, msg=lambda m, name=name: f"gradient of {name}:\n{m}")
    return out


def test_plugins_are_registered():
    for name in ("relative_bias", "alibi", "rope_2d"):
        info = plugins.get("position", name)
        assert info.doc and info.module == f"llmarch_compose.registry.position.{name}"


# --------------------------------------------------------------------- T5 relative bias


def naive_bucket(relative: int, bidirectional: bool, num_buckets: int, max_distance: int) -> int:
    """T5's bucket, one Python integer at a time, from the Mesh TensorFlow description:
    (encoder) the upper half of the buckets for keys after the query; in each half,
    num_buckets/2 exact distances, then log-spaced buckets up to max_distance."""
    bucket = 0
    if bidirectional:
        num_buckets //= 2
        if relative > 0:
            bucket += num_buckets
        distance = abs(relative)
    else:
        distance = max(-relative, 0)
    max_exact = num_buckets // 2
    if distance < max_exact:
        return bucket + distance
    large = max_exact + int(math.log(distance / max_exact) / math.log(max_distance / max_exact)
                            * (num_buckets - max_exact))
    return bucket + min(large, num_buckets - 1)


def relative_bias_module(num_buckets: int, max_distance: int, causal: bool):
    ctx = make_ctx("position=relative_bias", f"position.num_buckets={num_buckets}",
                   f"position.max_distance={max_distance}")
    return ctx.build("position", causal=causal)


BUCKET_CASES = [(32, 128), (16, 20), (8, 9), (5, 7), (4, 3), (64, 256)]


@pytest.mark.parametrize("bidirectional", [True, False], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets, max_distance", BUCKET_CASES)
def test_relative_buckets(num_buckets, max_distance, bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = torch.arange(-600, 601)
    naive = torch.tensor([naive_bucket(r, bidirectional, num_buckets, max_distance) for r in relative.tolist()])
    hf = T5Attention._relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    ours = relative_position_bucket(relative, bidirectional, num_buckets, max_distance)
    pe = relative_bias_module(num_buckets, max_distance, causal=not bidirectional)
    looked_up = pe.bucket(relative)  # the table of -max_distance..max_distance, clamped beyond
    assert torch.equal(hf, naive)
    assert torch.equal(ours, naive)
    assert torch.equal(looked_up, naive)
    # The range crosses every bucket kind: exact, logarithmic, saturated, in each direction
    # (distance 0 counts as "before", so the upper half starts at half + 1).
    half = num_buckets // 2 if bidirectional else num_buckets
    assert set(naive.tolist()) >= {0, half - 1} | ({half + 1, 2 * half - 1} if bidirectional else set())
    if not bidirectional:
        assert (naive[relative > 0] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize("num_buckets, max_distance, t", [(32, 128, 150), (8, 12, 40)])
def test_relative_bias_matches_t5_compute_bias(num_buckets, max_distance, t, causal):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    pe = randomize_(relative_bias_module(num_buckets, max_distance, causal), std=1.0)
    config = T5Config(d_model=64, d_kv=16, num_heads=4, relative_attention_num_buckets=num_buckets,
                      relative_attention_max_distance=max_distance, is_decoder=causal)
    t5 = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    with torch.no_grad():
        t5.relative_attention_bias.weight.copy_(pe.table.weight)
        want = t5.compute_bias(t, t)[0]  # [heads, q, k]
        inputs = pe.attention_inputs(torch.arange(t))
    assert inputs.bias.shape == (4, t, t) and inputs.rotary is None
    assert torch.equal(inputs.bias, want)
    # Encoder and decoder tables differ (else the direction would not be tested).
    other = relative_bias_module(num_buckets, max_distance, not causal)
    assert not torch.equal(other.buckets, pe.buckets)


@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder"])
def test_relative_bias_against_loop(causal):
    pe = randomize_(relative_bias_module(8, 12, causal).double(), std=1.0)
    table = pe.table.weight
    positions = torch.tensor([[0, 1, 2, 5, 40, 3, 17], [7, 7, 0, 1, 2, 200, 9]])
    with torch.no_grad():
        shared = pe.attention_inputs(positions[0]).bias
        batched = pe.attention_inputs(positions).bias
    assert shared.shape == (4, 7, 7) and batched.shape == (2, 4, 7, 7)
    for b in range(2):
        for h in range(4):
            for i in range(7):
                for j in range(7):
                    rel = positions[b, j].item() - positions[b, i].item()
                    want = table[naive_bucket(rel, not causal, 8, 12), h].item()
                    assert batched[b, h, i, j].item() == want
                    if b == 0:
                        assert shared[h, i, j].item() == want


def test_relative_bias_init_and_params():
    torch.manual_seed(0)
    pe = make_ctx("position=relative_bias", "model.init_std=0.5", "position.num_buckets=64").shared("position")
    w = pe.table.weight
    assert isinstance(pe.table, nn.Embedding) and w.shape == (64, 4)
    assert [n for n, _ in pe.named_parameters()] == ["table.weight"]
    assert 0.42 < w.std().item() < 0.58 and abs(w.mean().item()) < 0.1  # N(0, 0.5), 256 samples
    assert "buckets" not in pe.state_dict()  # derived from the params, never saved


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 5)],
                         ids=["decoder", "encoder", "decoder_window"])
def test_attention_with_relative_bias(causal, window):
    """Through attention: the scores get table[bucket(j - i), h], and the table gets its gradient."""
    overrides = ["position=relative_bias", "position.num_buckets=8", "position.max_distance=6"]
    overrides += ["attention=swa", f"model.window={window}"] if window else []
    ctx = make_ctx(*overrides)
    pe = randomize_(ctx.build("position", causal=causal).double(), seed=1, std=1.0)
    attn = randomize_(ctx.build("attention", causal=causal).double(), seed=2)
    t = 11
    positions = torch.arange(t)
    buckets = [[naive_bucket(j - i, not causal, 8, 6) for j in range(t)] for i in range(t)]

    def expected(x, p):
        table = p["position.table.weight"]
        bias = torch.stack([torch.stack([torch.stack([table[buckets[i][j], h] for j in range(t)])
                                         for i in range(t)]) for h in range(4)])
        return ref.attention(x, p["qkv.weight"], None, p["out.weight"], None, 4, 2, 16, causal, window,
                             score_bias=bias)

    params = {**dict(attn.named_parameters()), "position.table.weight": pe.table.weight}
    out = compare_forward_backward(lambda x: attn(x, pe.attention_inputs(positions)), expected,
                                   [randn(2, t, 64, scale=2.0)], params)
    assert len({b for row in buckets for b in row}) >= 7  # exact and logarithmic buckets
    with torch.no_grad():
        plain = attn(randn(2, t, 64, scale=2.0), lc.PositionInputs())
    assert (out - plain).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, key, value, hint", [
    (["position.num_buckets=3"], "position.num_buckets", 3, ">= 4"),
    (["position.num_buckets=32", "position.max_distance=16"], "position.max_distance", 16, "> 16"),
    (["position.num_buckets=8", "position.max_distance=4"], "position.max_distance", 4, "> 4"),
])
def test_relative_bias_validation(overrides, key, value, hint):
    with pytest.raises(ConfigError) as err:
        make_ctx("position=relative_bias", *overrides)
    assert err.value.key == key and err.value.value == value
    assert hint in str(err.value)
    make_ctx("position=relative_bias", "position.num_buckets=8", "position.max_distance=5")  # the edge is fine


# -------------------------------------------------------------------------------- ALiBi


def test_alibi_slopes_textbook():
    # Powers of two: 2^(-8k/n), k = 1..n.
    for n in (1, 2, 4, 8, 16, 32):
        assert alibi_slopes(n) == pytest.approx([2 ** (-8 * k / n) for k in range(1, n + 1)], rel=1e-15)
    # n = 6: the four slopes of 4 heads, then slopes 1 and 3 of 8 heads (2^-1, 2^-3).
    assert alibi_slopes(6) == pytest.approx([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], rel=1e-15)
    # n = 12: 2^-1 .. 2^-8, then 2^(-0.5), 2^(-1.5), 2^(-2.5), 2^(-3.5).
    assert alibi_slopes(12) == pytest.approx([2.0 ** -k for k in range(1, 9)]
                                             + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5], rel=1e-15)


@pytest.mark.parametrize("n_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 40, 64, 71])
def test_alibi_slopes_match_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 3, dtype=torch.long), n_heads, torch.float32)  # slope * key index
    want = alibi[:, 0, 1].double()
    got = torch.tensor(alibi_slopes(n_heads), dtype=F64)
    assert len(set(got.tolist())) == n_heads  # every head its own slope
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)  # BLOOM computes in float32


@pytest.mark.parametrize("n_heads", [4, 6, 12])
def test_alibi_module_slopes(n_heads):
    pe = make_ctx("position=alibi", f"model.n_heads={n_heads}", "model.n_kv_heads=1",
                  f"model.d_model={16 * n_heads}").shared("position")
    assert not list(pe.parameters()) and "slopes" not in pe.state_dict()
    assert pe.slopes.dtype == torch.float32
    torch.testing.assert_close(pe.slopes.double(), torch.tensor(alibi_slopes(n_heads), dtype=F64),
                               rtol=1e-7, atol=0)
    # A bf16 model keeps float32 slopes (a bf16 slope times a distance of 1000 would be off by ~4).
    model = lc.build(lc.compose([*TINY, "position=alibi"]), dtype=torch.bfloat16)
    assert model.position.slopes.dtype == torch.float32


def naive_alibi(positions: list[int], slopes: list[float], causal: bool) -> torch.Tensor:
    t = len(positions)
    bias = torch.zeros(len(slopes), t, t, dtype=F64)
    for h, slope in enumerate(slopes):
        for i in range(t):
            for j in range(t):
                distance = positions[i] - positions[j]
                if causal and j > i:
                    continue  # masked: not specified
                bias[h, i, j] = -slope * (distance if causal else abs(distance))
    return bias


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_alibi_bias_against_loop(causal):
    ctx = make_ctx("position=alibi")
    pe = ctx.build("position", causal=causal).double()
    slopes = alibi_slopes(4)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [0, 3, 9, 27, 100, 101, 300]])
    batched = pe.attention_inputs(positions).bias
    shared = pe.attention_inputs(torch.arange(7)).bias
    assert shared.shape == (4, 7, 7) and batched.shape == (2, 4, 7, 7)
    seen = torch.ones(7, 7).tril().bool() if causal else torch.ones(7, 7).bool()
    for b in range(2):
        want = naive_alibi(positions[b].tolist(), slopes, causal)
        torch.testing.assert_close(batched[b][:, seen], want[:, seen], rtol=1e-15, atol=0)
    torch.testing.assert_close(shared[:, seen], naive_alibi(list(range(7)), slopes, causal)[:, seen],
                               rtol=1e-15, atol=0)
    assert (shared[:, seen] <= 0).all() and (shared[:, 1, 0] < 0).all()


def test_alibi_agrees_with_bloom_under_softmax():
    """BLOOM adds +slope * j instead of -slope * (i - j): a shift of slope * i per row,
    which softmax ignores on causal rows."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    pe = make_ctx("position=alibi").shared("position").double()
    t = 9
    scores = randn(4, t, t, seed=3)
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    ours = scores + pe.attention_inputs(torch.arange(t)).bias
    bloom = scores + build_alibi_tensor(torch.ones(1, t, dtype=torch.long), 4, F64).reshape(4, 1, t)
    p_ours = ours.masked_fill(~mask, float("-inf")).softmax(-1)
    p_bloom = bloom.masked_fill(~mask, float("-inf")).softmax(-1)
    torch.testing.assert_close(p_ours, p_bloom, rtol=1e-6, atol=1e-7)  # BLOOM's slopes are float32
    assert (p_ours - scores.masked_fill(~mask, float("-inf")).softmax(-1)).abs().max() > 1e-2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_with_alibi(causal):
    """Attention with ALiBi equals a naive masked softmax of q.k / sqrt(d) - slope * |i - j|."""
    ctx = make_ctx("position=alibi")
    pe = ctx.build("position", causal=causal).double()
    attn = randomize_(ctx.build("attention", causal=causal).double(), seed=4)
    t = 8
    bias = naive_alibi(list(range(t)), alibi_slopes(4), causal)
    pos = pe.attention_inputs(torch.arange(t))

    def expected(x, p, score_bias=bias):
        return ref.attention(x, p["qkv.weight"], None, p["out.weight"], None, 4, 2, 16, causal, None,
                             score_bias=score_bias)

    params = dict(attn.named_parameters())
    out = compare_forward_backward(lambda x: attn(x, pos), expected, [randn(2, t, 64, scale=2.0)], params)
    without = expected(randn(2, t, 64, scale=2.0), params, None)
    assert (out - without).abs().max() > 1e-3  # the bias changes the answer


# ------------------------------------------------------------------------------ rope_2d


def naive_position_ids(t: int, prefix: int | None) -> tuple[list[int], list[int]]:
    """ChatGLM-6B: positions 0..P-1 then the last prefix position; block ids 0 in the prefix, then 1, 2, ..."""
    if prefix is None:
        return list(range(t)), [0] * t
    last = max(prefix - 1, 0)
    return list(range(prefix)) + [last] * (t - prefix), [0] * prefix + list(range(1, t - prefix + 1))


def rope_2d_module(*overrides: str):
    return make_ctx("position=rope_2d", *overrides).shared("position")


def test_rope_2d_position_ids():
    pe = rope_2d_module()
    t = 9
    prefix = torch.tensor([1, 4, 9, 0])
    pos, block = pe.position_ids(torch.arange(t), prefix)
    assert pos.shape == block.shape == (4, t)
    for row, p in enumerate(prefix.tolist()):
        want_pos, want_block = naive_position_ids(t, p)
        assert pos[row].tolist() == want_pos and block[row].tolist() == want_block
    assert naive_position_ids(6, 3) == ([0, 1, 2, 2, 2, 2], [0, 0, 0, 1, 2, 3])
    pos, block = pe.position_ids(torch.arange(t))
    assert pos.tolist() == list(range(t)) and block.tolist() == [0] * t


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rope_2d_inv_freq(theta):
    pe = rope_2d_module("model.head_dim=32", f"model.rope_theta={theta}")
    assert pe.inv_freq.dtype == torch.float32 and pe.inv_freq.shape == (8,)  # head_dim / 4 frequencies
    torch.testing.assert_close(pe.inv_freq.double(), ref.rope_inv_freq(theta, 16), rtol=1e-7, atol=0)
    assert not list(pe.parameters()) and "inv_freq" not in pe.state_dict()


def rope_2d_reference(x: torch.Tensor, t: int, prefix: list[int] | None, inv_freq: torch.Tensor) -> torch.Tensor:
    """Two independent rotary embeddings of head_dim / 2 dimensions (rotate-half layout within
    each): the first half by the position ids, the second by the block position ids."""
    d = x.shape[-1]
    if prefix is None:
        ids = naive_position_ids(t, None)
        pos, block = torch.tensor(ids[0]), torch.tensor(ids[1])
    else:
        rows = [naive_position_ids(t, p) for p in prefix]
        pos, block = torch.tensor([r[0] for r in rows]), torch.tensor([r[1] for r in rows])
    first = ref.rope_rotate(x[..., : d // 2], pos, inv_freq, d // 2, interleaved=False)
    second = ref.rope_rotate(x[..., d // 2:], block, inv_freq, d // 2, interleaved=False)
    return torch.cat((first, second), dim=-1)


@pytest.mark.parametrize("head_dim", [16, 32])
@pytest.mark.parametrize("prefix", [None, [3, 7], [9, 1], [5, 0]], ids=["no_prefix", "3_7", "9_1", "5_0"])
def test_rope_2d_rotation(prefix, head_dim):
    pe = rope_2d_module(f"model.head_dim={head_dim}").double()
    inv_freq = pe.inv_freq.double()  # its values are checked against the textbook above
    t = 9
    prefix_len = None if prefix is None else torch.tensor(prefix)
    inputs = pe.attention_inputs(torch.arange(t), prefix_len)
    assert inputs.prefix_len is prefix_len

    def actual(q, k):
        q2, k2 = pe.rotate(q, k, inputs)
        return torch.cat((q2.flatten(), k2.flatten()))

    def expected(q, k, p):
        return torch.cat((rope_2d_reference(q, t, prefix, inv_freq).flatten(),
                          rope_2d_reference(k, t, prefix, inv_freq).flatten()))

    q, k = randn(2, 4, t, head_dim, seed=1), randn(2, 2, t, head_dim, seed=2)
    out = compare_forward_backward(actual, expected, [q, k], {})
    q2 = out[: q.numel()].reshape(q.shape)
    half = head_dim // 2
    if prefix is None:  # block position 0 throughout: the second half is not rotated
        assert torch.equal(q2[..., half:], q[..., half:])
    else:  # the layout matters: ChatGLM's halves differ from one RoPE over the whole head
        whole = ref.rope_rotate(q, torch.tensor(naive_position_ids(t, prefix[0])[0]), ref.rope_inv_freq(
            10000.0, head_dim), head_dim, interleaved=False)
        assert (whole[0] - q2[0]).abs().max() > 1e-2


_ROPE_2D: list[nn.Module] = []  # built once: hypothesis reruns the test body (and shrinks on failure)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(0, 2000), n=st.integers(0, 2000), shift=st.integers(-2000, 2000),
       seed=st.integers(0, 2 ** 31 - 1))
def test_rope_2d_prefix_scores_depend_only_on_relative_position(m, n, shift, seed):
    """Within the prefix (block position 0), <R_m q, R_n k> over the first half depends on m - n
    only, and equals sum_i Re(z_q,i conj(z_k,i) e^{i (m - n) theta_i}); the second half is unrotated."""
    if m + shift < 0 or n + shift < 0:
        shift = -min(m, n)
    if not _ROPE_2D:
        _ROPE_2D.append(rope_2d_module().double())
    pe = _ROPE_2D[0]
    q1, k1 = randn(16, seed=seed), randn(16, seed=seed + 1)
    q = q1.expand(1, 1, 4, 16).clone()
    k = k1.expand(1, 1, 4, 16).clone()
    qr, kr = pe.rotate(q, k, pe.attention_inputs(torch.tensor([m, n, m + shift, n + shift])))
    before = (qr[0, 0, 0, :8] * kr[0, 0, 1, :8]).sum().item()
    after = (qr[0, 0, 2, :8] * kr[0, 0, 3, :8]).sum().item()
    assert after == pytest.approx(before, rel=1e-9, abs=1e-9)
    zq, zk = torch.complex(q1[:4], q1[4:8]), torch.complex(k1[:4], k1[4:8])
    phase = torch.polar(torch.ones(4, dtype=F64), (m - n) * pe.inv_freq.double())
    assert before == pytest.approx((zq * zk.conj() * phase).sum().real.item(), rel=1e-9, abs=1e-9)
    assert torch.equal(qr[0, 0, :, 8:], q[0, 0, :, 8:]) and torch.equal(kr[0, 0, :, 8:], k[0, 0, :, 8:])


def test_rope_2d_generated_tokens():
    """After the prefix every token keeps the last prefix position in the first half, and the
    second half moves with the block position, so its scores depend on the block distance."""
    pe = rope_2d_module().double()
    t, p = 12, 4
    q = randn(1, 1, 1, 16, seed=7).expand(1, 1, t, 16).clone()
    k = randn(1, 1, 1, 16, seed=8).expand(1, 1, t, 16).clone()
    qr, kr = pe.rotate(q, k, pe.attention_inputs(torch.arange(t), torch.tensor([p])))
    for i in range(p, t):  # the first half as at position p - 1
        torch.testing.assert_close(qr[0, 0, i, :8], qr[0, 0, p - 1, :8], **TIGHT)
    assert torch.equal(qr[0, 0, :p, 8:], q[0, 0, :p, 8:])  # block position 0 in the prefix

    def second_half_score(i, j):
        return (qr[0, 0, i, 8:] * kr[0, 0, j, 8:]).sum().item()

    assert second_half_score(9, 6) == pytest.approx(second_half_score(7, 4), rel=1e-9)
    assert abs(second_half_score(9, 6) - second_half_score(9, 5)) > 1e-3


@pytest.mark.parametrize("overrides, key, value, valid", [
    (["model.head_dim=18"], "model.head_dim", 18, [16, 20]),
    (["model.d_model=72", "model.n_heads=4"], "model.head_dim", 18, [16, 20]),
    (["model.head_dim=2"], "model.head_dim", 2, [4]),
    (["position.theta=-1"], "position.theta", -1, "a number > 0"),
])
def test_rope_2d_validation(overrides, key, value, valid):
    with pytest.raises(ConfigError) as err:
        make_ctx("position=rope_2d", *overrides)
    assert (err.value.key, err.value.value, err.value.valid) == (key, value, valid)


@pytest.mark.slow
def test_rope_2d_prefix_inputs_compile_to_one_graph():
    """Position ids from a runtime prefix length: no .item(), no data-dependent shapes."""
    pe = rope_2d_module()
    q, k = randn(2, 4, 10, 16).float(), randn(2, 2, 10, 16, seed=1).float()

    def rotate(positions, prefix_len):
        return pe.rotate(q, k, pe.attention_inputs(positions, prefix_len))

    compiled = torch.compile(rotate, fullgraph=True)
    for prefix in ([3, 7], [10, 1]):
        prefix_len = torch.tensor(prefix)
        for a, e in zip(compiled(torch.arange(10), prefix_len), rotate(torch.arange(10), prefix_len)):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------- tiny models


@pytest.mark.slow
@pytest.mark.parametrize("position", ["relative_bias", "alibi", "rope_2d"])
def test_tiny_model_trains_and_compiles(tiny_cfg, position):
    cfg = tiny_cfg(f"position={position}")
    assert lc.build(cfg, device="meta").position.__class__ is plugins.get("position", position).cls
    torch.manual_seed(0)
    model = lc.build(cfg)
    eager = copy.deepcopy(model)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    out = model(ids)
    assert out.logits.shape == (2, 16, 128) and torch.isfinite(out.logits).all()
    out.logits.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if position == "relative_bias":
        assert model.position.table.weight.grad.abs().max() > 0
    compiled = torch.compile(eager, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
