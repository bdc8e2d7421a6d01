"""Every built-in plugin against an independent naive reference (tests/reference.py).

Each test builds one plugin (or a whole tiny model) from a composed config,
gives every parameter random values (zero biases and unit norm weights would
hide mistakes), and compares forward outputs and the gradients of a random
projection of them, with respect to the inputs and to every parameter, with
what the reference computes from clones of the same weights. Comparisons run
in float64 with tolerance 1e-10 unless a plugin computes part of its work in
float32 by design (RMSNorm, the MoE router, the position tables), where the
tolerance says so.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import llmarch_compose as lc
import reference as ref
from conftest import TINY

F64 = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64, same maths
FP32_INSIDE = dict(rtol=2e-6, atol=2e-6)  # float64 in, but the plugin computes in float32 by design
# The MoE router runs in float32 by design (as Mixtral's does). Its gradients sum terms of up to
# ~100 that cancel (the top-k renormalization), so fp32 rounding shows as an absolute error of up
# to ~1e-7 of the largest gradient entry: the tolerance is scaled to each tensor's largest entry.
ROUTER_FP32 = dict(rtol=1e-5, atol=1e-5, atol_per_max=1e-6)


# ---------------------------------------------------------------------------- helpers


def make_ctx(*overrides: str) -> lc.BuildContext:
    return lc.BuildContext(lc.resolve_spec(lc.compose([*TINY, *overrides])))


def randomize_(module: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Random values for every parameter: matrices N(0, std), norm weights 1 + N(0, 0.3),
    biases N(0, 0.3)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype)
            if p.dim() >= 2:
                p.copy_(noise * std)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return module


def randn(*shape: int, seed: int = 0, dtype=F64, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def check_forward_backward(actual: Callable[..., torch.Tensor], expected: Callable[..., torch.Tensor],
                           module: nn.Module | None, inputs: Sequence[torch.Tensor], tol: dict) -> torch.Tensor:
    """Compare actual(*inputs) with expected(*inputs, params) and the gradients of
    sum(out * g), g random, w.r.t. each input and each parameter of `module`.
    `expected` gets clones of the module's parameters, by name, so its gradients are its own."""
    params = dict(module.named_parameters()) if module is not None else {}
    xa = [x.detach().clone().requires_grad_() for x in inputs]
    out = actual(*xa)
    ref_params = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    xr = [x.detach().clone().requires_grad_() for x in inputs]
    want = expected(*xr, ref_params)
    assert_close(out, want, tol, "forward")
    g = randn(*out.shape, seed=1234, dtype=out.dtype)
    names = [f"input {i}" for i in range(len(xa))] + list(params)
    got_grads = torch.autograd.grad(out, [*xa, *params.values()], g)
    want_grads = torch.autograd.grad(want, [*xr, *ref_params.values()], g)
    for name, a, e in zip(names, got_grads, want_grads):
        assert_close(a, e, tol, f"gradient of {name}")
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    atol = max(tol["atol"], tol.get("atol_per_max", 0.0) * expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=atol,
                               msg=lambda m: f"{what} differs from the reference:\n{m}")


# ------------------------------------------------------------------------------ norms


@pytest.mark.parametrize("eps", [1e-5, 0.5])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_layernorm(eps, bias):
    norm = make_ctx("norm=layernorm", f"norm.bias={str(bias).lower()}", f"model.norm_eps={eps}").build("norm")
    assert (norm.bias is not None) == bias
    randomize_(norm.double())
    x = randn(2, 5, 64, scale=3.0) + 1.5
    check_forward_backward(norm, lambda x, p: ref.layernorm(x, p["weight"], p.get("bias"), eps), norm, [x], TIGHT)


def test_layernorm_without_affine_parameters():
    """OLMo-1's non-parametric LayerNorm: no weight, no bias; the bias flag must agree."""
    norm = make_ctx("norm=layernorm", "norm.affine=false", "norm.bias=false").build("norm")
    assert norm.weight is None and norm.bias is None and not list(norm.parameters())
    x = randn(2, 5, 64, scale=3.0) + 1.5
    check_forward_backward(norm, lambda x, p: ref.layernorm(x, None, None, 1e-5), None, [x], TIGHT)
    with pytest.raises(lc.ConfigError, match="norm.bias"):
        make_ctx("norm=layernorm", "norm.affine=false")


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_rmsnorm(eps, dtype):
    norm = make_ctx("norm=rmsnorm", f"model.norm_eps={eps}").build("norm")
    assert not any(n.endswith("bias") for n, _ in norm.named_parameters())
    randomize_(norm.to(dtype))
    x = randn(2, 5, 64, scale=3.0, dtype=dtype) + 1.5
    # RMSNorm computes in float32 by design (its docstring), also for float64 inputs.
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else FP32_INSIDE
    check_forward_backward(norm, lambda x, p: ref.rmsnorm(x, p["weight"], eps), norm, [x], tol)


def test_rmsnorm_upcasts_half_precision_inputs():
    """A bf16 input is normalized in float32, then rounded once: the result is the exact
    answer (computed from the same bf16 input) up to one bf16 rounding."""
    norm = make_ctx("norm=rmsnorm").build("norm")
    x = randn(3, 64, scale=4.0).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.float32  # an fp32 weight times a bf16 tensor promotes
    want = ref.rmsnorm(x.double(), norm.weight.double(), norm.eps)
    torch.testing.assert_close(out.double(), want, rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("offset", [1.0, -0.5])
def test_rmsnorm_offset(offset):
    """norm.offset: scale by (offset + weight), the weights starting at a unit scale."""
    norm = make_ctx("norm=rmsnorm", f"norm.offset={offset}").build("norm")
    assert torch.equal(norm.weight, torch.full((64,), 1.0 - offset))
    randomize_(norm.double())
    x = randn(2, 5, 64, scale=3.0) + 1.5
    check_forward_backward(norm, lambda x, p: ref.rmsnorm(x, p["weight"], norm.eps, offset), norm, [x], FP32_INSIDE)


def test_rmsnorm_offset_rounds_as_gemma_does():
    """With an offset the product is taken in float32 and rounded once to the input's dtype:
    bit for bit what transformers' GemmaRMSNorm gives, in bfloat16 as in float32."""
    transformers = pytest.importorskip("transformers")
    theirs = transformers.models.gemma.modeling_gemma.GemmaRMSNorm(64, eps=1e-6)
    norm = make_ctx("norm=rmsnorm", "norm.offset=1.0", "model.norm_eps=1e-6").build("norm")
    with torch.no_grad():
        theirs.weight.copy_(randn(64, seed=3, dtype=torch.float32, scale=0.5))
        norm.weight.copy_(theirs.weight)
    for dtype in (torch.float32, torch.bfloat16):
        x = randn(3, 7, 64, scale=4.0, dtype=dtype)
        mine, want = norm.to(dtype)(x), theirs.to(dtype)(x)
        assert mine.dtype == want.dtype == dtype
        assert torch.equal(mine, want)


def test_rmsnorm_offset_is_validated():
    with pytest.raises(lc.ConfigError, match="norm.offset"):
        make_ctx("norm=rmsnorm", "norm.offset=.nan")


@pytest.mark.parametrize("name", ["layernorm", "rmsnorm"])
def test_norm_dim_argument(name):
    norm = make_ctx(f"norm={name}").build("norm", dim=12)
    randomize_(norm.double())
    x = randn(4, 12)
    expect = (lambda x, p: ref.layernorm(x, p["weight"], p["bias"], norm.eps)) if name == "layernorm" else (
        lambda x, p: ref.rmsnorm(x, p["weight"], norm.eps))
    check_forward_backward(norm, expect, norm, [x], TIGHT if name == "layernorm" else FP32_INSIDE)


# ------------------------------------------------------------------------ activations

#: reference key -> overrides that select it
ACTIVATION_CASES = {
    "relu": ["activation=relu"],
    "gelu": ["activation=gelu"],
    "gelu_tanh": ["activation=gelu_tanh"],
    "silu": ["activation=silu"],
    "reglu": ["activation=reglu"],
    "geglu": ["activation=geglu"],
    "geglu_tanh": ["activation=geglu", "activation.approximate=tanh"],
    "swiglu": ["activation=swiglu"],
}


@pytest.mark.parametrize("key", list(ACTIVATION_CASES))
def test_activation_elementwise(key):
    fn, gated = ref.ACTIVATIONS[key]
    act = make_ctx(*ACTIVATION_CASES[key]).shared("activation")
    assert act.gated is gated
    x = torch.cat([torch.linspace(-8, 8, 161, dtype=F64), randn(64, scale=2.0)])
    check_forward_backward(act, lambda x, p: fn(x), None, [x], TIGHT)


def test_gelu_approximations_differ():
    """The exact and tanh references must not coincide, or the two tests above prove nothing."""
    x = torch.linspace(-3, 3, 61, dtype=F64)
    assert (ref.gelu_exact(x) - ref.gelu_tanh(x)).abs().max() > 1e-4
    exact = make_ctx("activation=gelu").shared("activation")
    tanh = make_ctx("activation=gelu_tanh").shared("activation")
    assert (exact(x) - tanh(x)).abs().max() > 1e-4


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "mlp_bias"])
@pytest.mark.parametrize("key", list(ACTIVATION_CASES))
def test_dense_ffn(key, bias):
    fn, gated = ref.ACTIVATIONS[key]
    hidden = 40 if key == "swiglu" else 96  # one case where ffn.hidden differs from model.ffn_dim
    extra = ["ffn.hidden=40"] if hidden != 96 else []
    ffn = make_ctx("ffn=dense", *ACTIVATION_CASES[key], f"model.mlp_bias={str(bias).lower()}", *extra).build("ffn")
    assert ffn.up.weight.shape == (hidden * (2 if gated else 1), 64)
    assert ffn.down.weight.shape == (64, hidden)
    assert (ffn.up.bias is not None) == bias and (ffn.down.bias is not None) == bias
    randomize_(ffn.double())
    x = randn(2, 5, 64)
    assert ffn(x).aux_loss is None

    def expected(x, p):
        return ref.dense_ffn(x, p["up.weight"], p.get("up.bias"), p["down.weight"], p.get("down.bias"),
                             fn, gated, hidden)

    check_forward_backward(lambda x: ffn(x).output, expected, ffn, [x], TIGHT)


# -------------------------------------------------------------------------- positions


@pytest.mark.parametrize("offset", [0, 2])
@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_positions", "per_batch_positions"])
def test_learned_position(offset, per_batch):
    pe = make_ctx("position=learned", f"position.offset={offset}").shared("position")
    assert pe.table.weight.shape == (64 + offset, 64)
    randomize_(pe.double())
    positions = torch.tensor([[0, 3, 1, 63, 7], [5, 5, 2, 0, 9]]) if per_batch else torch.tensor([4, 0, 63, 1, 2])

    def expected(x, p):
        rows = []
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                pos = int(positions[b, t] if per_batch else positions[t])
                rows.append(x[b, t] + p["table.weight"][pos + offset])
        return torch.stack(rows).reshape(x.shape)

    check_forward_backward(lambda x: pe.embed(x, positions), expected, pe, [randn(2, 5, 64)], TIGHT)
    assert pe.attention_inputs(positions) == lc.PositionInputs()


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
@pytest.mark.parametrize("base", [10000.0, 500.0])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_sinusoidal_position(base, dtype, layout):
    pe = make_ctx("position=sinusoidal", f"position.base={base}", f"position.layout={layout}").shared(
        "position").to(dtype)
    assert not list(pe.parameters())
    table = ref.sinusoidal_table(50, 64, base, halves=layout == "halves")
    positions = torch.tensor([[0, 1, 2, 17, 49], [49, 30, 3, 3, 8]])
    x = randn(2, 5, 64, dtype=dtype)
    # The table is built in float32 (angles up to 49 rad): ~1e-6 absolute either way.
    tol = dict(rtol=1e-5, atol=1e-5)
    check_forward_backward(lambda x: pe.embed(x, positions), lambda x, p: x + table[positions].to(dtype),
                           None, [x], tol)
    assert pe.attention_inputs(torch.arange(5)) == lc.PositionInputs()


def test_sinusoidal_halves_match_marian():
    """Marian's table: the sines of every frequency, then the cosines."""
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    theirs = MarianSinusoidalPositionalEmbedding(50, 64)
    theirs.weight.data = theirs.create_weight()
    pe = make_ctx("position=sinusoidal", "position.layout=halves").shared("position")
    positions = torch.arange(50)
    torch.testing.assert_close(pe.embed(torch.zeros(50, 64), positions), theirs(torch.Size([1, 50])),
                               rtol=0, atol=2e-5)  # theirs in float64 rounded once, ours in float32


def test_sinusoidal_layout_is_validated():
    with pytest.raises(lc.ConfigError) as info:
        make_ctx("position=sinusoidal", "position.layout=stacked")
    assert info.value.key == "position.layout"


def test_no_position():
    pe = make_ctx("position=none").shared("position")
    assert not list(pe.parameters())
    x, q, k = randn(2, 5, 64), randn(2, 4, 5, 16), randn(2, 2, 5, 16)
    positions = torch.arange(5)
    assert torch.equal(pe.embed(x, positions), x)
    inputs = pe.attention_inputs(positions)
    assert inputs.rotary is None and inputs.bias is None
    q2, k2 = pe.rotate(q, k, inputs)
    assert torch.equal(q2, q) and torch.equal(k2, k)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_rope_base_inverse_frequencies(theta, fraction):
    pe = make_ctx("model.head_dim=64", f"model.rope_theta={theta}", f"model.rotary_fraction={fraction}").shared(
        "position")
    rot = int(64 * fraction)
    assert pe.rotary_dim == rot and pe.attention_factor == 1.0
    assert pe.inv_freq.dtype == torch.float32
    # float64 maths rounded once to float32: within half an fp32 ulp.
    torch.testing.assert_close(pe.inv_freq.double(), ref.rope_inv_freq(theta, rot), rtol=1e-7, atol=0)


ROPE_CASES = {
    "halves": [],
    "interleaved": ["position.interleaved=true"],
    "partial": ["model.rotary_fraction=0.5"],
    "partial_interleaved": ["model.rotary_fraction=0.5", "position.interleaved=true"],
    "yarn": ["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:16}"],
    "llama3": ["model.rope_scaling={type:llama3,factor:8,original_max_seq_len:16}"],
}


@pytest.mark.parametrize("per_batch", [False, True], ids=["shared_positions", "per_batch_positions"])
@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_rotation(case, per_batch):
    """Queries and keys rotated as complex numbers: pair i is (x_i, x_{i+rot/2}), or
    (x_2i, x_2i+1) when interleaved; dimensions past the rotary ones pass through."""
    pe = make_ctx(*ROPE_CASES[case]).shared("position").double()
    interleaved = "interleaved" in case
    rot = 8 if "partial" in case else 16
    assert pe.rotary_dim == rot and pe.interleaved is interleaved
    if case == "yarn":
        assert pe.attention_factor > 1.0
    positions = torch.tensor([[0, 1, 7, 30, 2, 100], [3, 3, 0, 55, 9, 1]]) if per_batch else torch.tensor(
        [0, 1, 2, 7, 30, 100])
    inputs = pe.attention_inputs(positions)
    inv_freq = pe.inv_freq.double()  # its values are checked against textbook and transformers elsewhere

    def actual(q, k):
        q2, k2 = pe.rotate(q, k, inputs)
        return torch.cat((q2.flatten(), k2.flatten()))

    def expected(q, k, p):
        qr = ref.rope_rotate(q, positions, inv_freq, rot, interleaved, pe.attention_factor)
        kr = ref.rope_rotate(k, positions, inv_freq, rot, interleaved, pe.attention_factor)
        return torch.cat((qr.flatten(), kr.flatten()))

    q, k = randn(2, 4, 6, 16, seed=1), randn(2, 2, 6, 16, seed=2)
    out = check_forward_backward(actual, expected, None, [q, k], TIGHT)
    if rot < 16:  # the pass-through part is untouched
        q2 = out[: q.numel()].reshape(q.shape)
        assert torch.equal(q2[..., rot:], q[..., rot:])


# A few RoPE modules for the hypothesis test, built once (hypothesis reruns the body).
_ROPE_MODULES: dict[str, nn.Module] = {}


def _rope_module(case: str) -> nn.Module:
    if case not in _ROPE_MODULES:
        _ROPE_MODULES[case] = make_ctx(*ROPE_CASES[case]).shared("position").double()
    return _ROPE_MODULES[case]


@pytest.mark.parametrize("case", ["halves", "partial_interleaved", "yarn"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(0, 3000), n=st.integers(0, 3000), shift=st.integers(-3000, 3000),
       seed=st.integers(0, 2 ** 31 - 1))
def test_rope_scores_depend_only_on_relative_position(case, m, n, shift, seed):
    """<R_m q, R_n k> = <R_{m+s} q, R_{n+s} k>, and both equal the closed form
    af^2 Re(sum_i z_q,i conj(z_k,i) e^{i (m-n) theta_i}) + <q_pass, k_pass>."""
    if m + shift < 0 or n + shift < 0:
        shift = -min(m, n)
    pe = _rope_module(case)
    q1, k1 = randn(16, seed=seed), randn(16, seed=seed + 1)
    positions = torch.tensor([m, n, m + shift, n + shift])
    q = q1.expand(1, 1, 4, 16).clone()
    k = k1.expand(1, 1, 4, 16).clone()
    qr, kr = pe.rotate(q, k, pe.attention_inputs(positions))
    before = (qr[0, 0, 0] * kr[0, 0, 1]).sum().item()
    after = (qr[0, 0, 2] * kr[0, 0, 3]).sum().item()
    assert after == pytest.approx(before, rel=1e-9, abs=1e-9)

    rot, half = pe.rotary_dim, pe.rotary_dim // 2
    if pe.interleaved:
        zq = torch.complex(q1[0:rot:2], q1[1:rot:2])
        zk = torch.complex(k1[0:rot:2], k1[1:rot:2])
    else:
        zq = torch.complex(q1[:half], q1[half:rot])
        zk = torch.complex(k1[:half], k1[half:rot])
    phase = torch.polar(torch.ones(half, dtype=F64), (m - n) * pe.inv_freq.double())
    closed = (pe.attention_factor ** 2 * (zq * zk.conj() * phase).sum().real
              + (q1[rot:] * k1[rot:]).sum()).item()
    assert before == pytest.approx(closed, rel=1e-9, abs=1e-9)


# RoPE scalings against transformers' own implementation (modeling_rope_utils).

SCALING_CASES = {
    "linear": (["model.rope_scaling={type:linear,factor:4}"],
               dict(rope_type="linear", factor=4.0), 256),
    "linear_partial": (["model.rope_scaling={type:linear,factor:2.5}", "model.rotary_fraction=0.5"],
                       dict(rope_type="linear", factor=2.5, partial_rotary_factor=0.5), 256),
    "llama3": (["model.rope_scaling={type:llama3,factor:8,original_max_seq_len:256,"
                "low_freq_factor:1,high_freq_factor:4}"],
               dict(rope_type="llama3", factor=8.0, original_max_position_embeddings=256,
                    low_freq_factor=1.0, high_freq_factor=4.0), 2048),
    "llama3_theta": (["model.rope_theta=500000", "model.rope_scaling={type:llama3,factor:32,"
                      "original_max_seq_len:512,low_freq_factor:2,high_freq_factor:8}"],
                     dict(rope_type="llama3", factor=32.0, original_max_position_embeddings=512,
                          low_freq_factor=2.0, high_freq_factor=8.0), 2048),
    # Original lengths large enough that the ramp between beta_fast and beta_slow falls inside
    # the head (dimensions ~10..23 of 32 for 4096), so the ramp's bounds matter.
    "yarn": (["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:4096}"],
             dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096), 32768),
    "yarn_betas": (["model.rope_scaling={type:yarn,factor:4,original_max_seq_len:2048,beta_fast:16,beta_slow:2}"],
                   dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048,
                        beta_fast=16.0, beta_slow=2.0), 8192),
    "yarn_attention_factor": (["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:4096,"
                               "attention_factor:1.5}"],
                              dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=4096,
                                   attention_factor=1.5), 32768),
    "yarn_partial": (["model.rope_scaling={type:yarn,factor:16,original_max_seq_len:4096}",
                      "model.rotary_fraction=0.5"],
                     dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=4096,
                          partial_rotary_factor=0.5), 65536),
    "yarn_short": (["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:256}"],
                   dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256), 2048),
    # gpt-oss: the ramp's ends left unrounded (truncate: false).
    "yarn_untruncated": (["model.rope_theta=150000", "model.rope_scaling={type:yarn,factor:32,"
                          "original_max_seq_len:4096,truncate:false}"],
                         dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096, truncate=False),
                         131072),
}


def hf_rope(rope_parameters: dict, theta: float, max_positions: int, seq_len=None):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=max_positions,
                         rope_parameters={**rope_parameters, "rope_theta": theta})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, None, seq_len=seq_len)
    return inv_freq.double(), attention_factor


@pytest.mark.parametrize("case", list(SCALING_CASES))
def test_rope_scaling_matches_transformers(case):
    overrides, hf_params, max_positions = SCALING_CASES[case]
    pe = make_ctx("model.head_dim=64", *overrides).shared("position")
    theta = pe.params.theta
    want, want_factor = hf_rope(hf_params, theta, max_positions)
    assert pe.inv_freq.shape == want.shape
    torch.testing.assert_close(pe.inv_freq.double(), want, rtol=1e-6, atol=0)
    assert pe.attention_factor == pytest.approx(want_factor, rel=1e-12)
    base = ref.rope_inv_freq(theta, pe.rotary_dim)
    if hf_params["rope_type"] == "llama3":  # the test must cross all three bands
        s = pe.params.scaling
        wavelen = 2 * math.pi / base
        assert (wavelen > s.original_max_seq_len / s.low_freq_factor).any()
        assert (wavelen < s.original_max_seq_len / s.high_freq_factor).any()
        middle = (wavelen <= s.original_max_seq_len / s.low_freq_factor) & (
            wavelen >= s.original_max_seq_len / s.high_freq_factor)
        assert middle.any()
    assert not torch.allclose(want, base, rtol=1e-3)  # the scaling changes something
    if case == "yarn_untruncated":  # unrounded ends give other frequencies than the rounded ones
        rounded, _ = hf_rope({**hf_params, "truncate": True}, theta, max_positions)
        assert not torch.allclose(rounded, want, rtol=1e-6)
    if case in ("yarn", "yarn_betas", "yarn_partial"):  # some frequencies kept, some divided, some blended
        ratio = base / want
        assert (ratio - 1).abs().min() < 1e-6
        factor = pe.params.scaling.factor
        assert (ratio - factor).abs().min() < 1e-5 * factor
        assert ((ratio > 1 + 1e-3) & (ratio < factor * (1 - 1e-3))).any()
    # The tables handed to attention use these frequencies and the attention factor.
    positions = torch.arange(100)
    cos, sin = pe.attention_inputs(positions).rotary
    angles = positions.double()[:, None] * want
    half = pe.rotary_dim // 2
    torch.testing.assert_close(cos[:, :half].double(), angles.cos() * want_factor, rtol=0, atol=1e-4)
    torch.testing.assert_close(sin[:, half:].double(), angles.sin() * want_factor, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seq_len", [32, 64, 65, 100, 300])
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_rope_dynamic_ntk_matches_transformers(seq_len, fraction):
    pe = make_ctx("model.head_dim=64", f"model.rotary_fraction={fraction}",
                  "model.rope_scaling={type:dynamic,factor:4,original_max_seq_len:64}").shared("position")
    hf_params = dict(rope_type="dynamic", factor=4.0, partial_rotary_factor=fraction)
    # transformers takes the pre-training length from max_position_embeddings.
    want, want_factor = hf_rope(hf_params, pe.params.theta, 64, seq_len=seq_len)
    got = pe._inv_freq_for(seq_len)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    assert pe.attention_factor == want_factor == 1.0
    base = ref.rope_inv_freq(pe.params.theta, pe.rotary_dim)
    assert torch.allclose(got.double(), base, rtol=1e-6) == (seq_len <= 64)
    if seq_len <= 100:  # the table handed to attention is built from the length-dependent frequencies
        cos, _ = pe.attention_inputs(torch.arange(seq_len)).rotary
        angles = torch.arange(seq_len).double()[:, None] * want
        torch.testing.assert_close(cos[:, : pe.rotary_dim // 2].double(), angles.cos(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("position", ["rope", "sinusoidal"])
def test_low_precision_build_keeps_position_angles(position):
    cfg = lc.compose([*TINY, f"position={position}"])
    fp32, bf16 = lc.build(cfg), lc.build(cfg, dtype=torch.bfloat16)
    positions = torch.arange(1024)
    if position == "rope":
        want = fp32.position.attention_inputs(positions).rotary[0]
        got = bf16.position.attention_inputs(positions).rotary[0]
    else:
        x = torch.zeros(1024, 64)
        want, got = fp32.position.embed(x, positions), bf16.position.embed(x.bfloat16(), positions)
    # bf16 rounding of a value in [-1, 1] is at most 2^-9; wrong angles give errors near 1.
    assert (got.float() - want).abs().max().item() < 1e-2


# -------------------------------------------------------------------------- attention

ATTENTION_CASES = {
    # id: (overrides, causal, n_kv_heads, window)
    "gqa": ([], True, 2, None),
    "mha": (["attention=mha"], True, 4, None),
    "mqa": (["attention=mqa"], True, 1, None),
    "swa": (["attention=swa", "model.window=5"], True, 2, 5),
    "swa_mqa": (["attention=swa", "model.window=3", "attention.num_kv_heads=1"], True, 1, 3),
    "swa_window1": (["attention=swa", "model.window=1"], True, 2, 1),
    "qkv_bias": (["model.qkv_bias=true"], True, 2, None),
    "attention_bias": (["model.attention_bias=true"], True, 2, None),
    "scale": (["attention.scale=0.1"], True, 2, None),
    "noncausal": ([], False, 2, None),
    "noncausal_mha": (["attention=mha"], False, 4, None),
    "noncausal_window": (["attention=swa", "model.window=3"], False, 2, 3),
    "rope_interleaved": (["position.interleaved=true"], True, 2, None),
    "rope_partial": (["model.rotary_fraction=0.5"], True, 2, None),
    "rope_yarn": (["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:4}"], True, 2, None),
    "no_position": (["position=none"], True, 2, None),
    "rope_not_rotated": (["attention.rotary=false"], True, 2, None),  # a NoPE layer under RoPE (SmolLM3)
    "rope_not_rotated_window": (["attention=swa", "model.window=4", "attention.rotary=false"], True, 2, 4),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention(case):
    overrides, causal, n_kv, window = ATTENTION_CASES[case]
    ctx = make_ctx(*overrides)
    attn = ctx.build("attention", layer_idx=0, causal=causal)
    pe = ctx.position.double()
    assert (attn.n_heads, attn.n_kv_heads, attn.head_dim, attn.window) == (4, n_kv, 16, window)
    assert (attn.qkv.bias is not None) == ("bias" in case)
    assert (attn.out.bias is not None) == (case == "attention_bias")
    randomize_(attn.double(), std=0.25)
    t = 9
    positions = torch.arange(t)
    pos = pe.attention_inputs(positions)
    if isinstance(pe, lc.PositionEncoding) and pos.rotary is not None and "not_rotated" not in case:
        def rotate(x):
            return ref.rope_rotate(x, positions, pe.inv_freq, pe.rotary_dim, pe.interleaved, pe.attention_factor)
    else:
        rotate = None
    scale = 0.1 if case == "scale" else None

    def expected(x, p):
        return ref.attention(x, p["qkv.weight"], p.get("qkv.bias"), p["out.weight"], p.get("out.bias"),
                             4, n_kv, 16, causal, window, rotate, scale)

    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(2, t, 64)], TIGHT)


def test_unrotated_attention_needs_a_rotating_position_plugin():
    with pytest.raises(lc.ConfigError, match="attention.rotary"):
        make_ctx("position=learned", "attention.rotary=false").build("attention", layer_idx=0)


@pytest.mark.parametrize("causal, window", [(True, None), (False, None), (True, 4), (False, 3)],
                         ids=["causal", "bidirectional", "causal_window", "bidirectional_window"])
def test_attention_score_bias(causal, window):
    """The additive score bias a position plugin may hand over (ALiBi, T5 buckets) is added
    to the scaled scores, and masked positions stay masked."""
    overrides = ["position=none"] + (["attention=swa", f"model.window={window}"] if window else [])
    attn = randomize_(make_ctx(*overrides).build("attention", causal=causal).double(), std=0.25)
    t = 7
    bias = randn(4, t, t, seed=11, scale=2.0)

    def actual(x, b):
        return attn(x, lc.PositionInputs(bias=b))

    def expected(x, b, p):
        return ref.attention(x, p["qkv.weight"], None, p["out.weight"], None, 4, 2, 16, causal, window,
                             score_bias=b)

    check_forward_backward(actual, expected, attn, [randn(2, t, 64), bias], TIGHT)


def test_attention_mask_matters():
    """The causal and window references must change the answer, or the tests above prove nothing."""
    ctx = make_ctx()
    attn = randomize_(ctx.build("attention").double(), std=0.25)
    x, pos = randn(1, 9, 64), ctx.position.double().attention_inputs(torch.arange(9))
    p = dict(attn.named_parameters())
    args = (x, p["qkv.weight"], None, p["out.weight"], None, 4, 2, 16)
    full = ref.attention(*args, False, None)
    causal = ref.attention(*args, True, None)
    windowed = ref.attention(*args, True, 3)
    assert (full - causal).abs().max() > 1e-3 and (causal - windowed).abs().max() > 1e-3


# -------------------------------------------------------------------------------- MoE

MOE_CASES = {
    # id: (activation key, top_k, normalize)
    "swiglu_top2_norm": ("swiglu", 2, True),
    "swiglu_top2_raw": ("swiglu", 2, False),
    "gelu_top2_norm": ("gelu", 2, True),
    "relu_top1_norm": ("relu", 1, True),
    "silu_top1_raw": ("silu", 1, False),
    "geglu_top3_raw": ("geglu", 3, False),
    "reglu_top4_norm": ("reglu", 4, True),
}


def build_moe(case):
    key, top_k, normalize = MOE_CASES[case]
    ctx = make_ctx("ffn=moe", *ACTIVATION_CASES[key], "model.n_experts=4", f"model.experts_per_token={top_k}",
                   f"ffn.normalize_top_k={str(normalize).lower()}", "model.router_aux_loss_coef=0.05",
                   "model.ffn_dim=24")
    moe = ctx.build("ffn", layer_idx=0)
    assert (moe.num_experts, moe.top_k, moe.normalize_top_k, moe.aux_loss_coef) == (4, top_k, normalize, 0.05)
    return randomize_(moe.double(), std=0.3)


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe(case):
    key, top_k, normalize = MOE_CASES[case]
    fn, gated = ref.ACTIVATIONS[key]
    moe = build_moe(case)
    assert moe.w_in.shape == (4, 64, 24 * (2 if gated else 1)) and moe.w_out.shape == (4, 24, 64)

    def actual(x):
        out = moe(x)
        return torch.cat((out.output.flatten(), out.aux_loss.reshape(1).to(x.dtype)))

    def expected(x, p):
        y, probs, chosen = ref.moe(x, p["router.weight"], p["w_in"], p["w_out"], fn, gated, 24, top_k, normalize)
        aux = 0.05 * ref.switch_balance_loss(probs, chosen, 4)
        return torch.cat((y.flatten(), aux.reshape(1)))

    check_forward_backward(actual, expected, moe, [randn(2, 5, 64)], ROUTER_FP32)


@pytest.mark.parametrize("case", ["swiglu_top2_norm", "relu_top1_norm", "geglu_top3_raw"])
def test_moe_aux_loss_matches_transformers(case):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    _, top_k, _ = MOE_CASES[case]
    moe = build_moe(case)
    x = randn(3, 7, 64, seed=5)
    with torch.no_grad():
        aux = moe(x).aux_loss
        logits = moe.router(x.reshape(-1, 64))
    got = aux.double().item() / moe.aux_loss_coef
    hf = load_balancing_loss_func((logits,), num_experts=4, top_k=top_k).item()
    probs = torch.softmax(logits, dim=-1)
    chosen = [sorted(range(4), key=lambda e: -float(row[e]))[:top_k] for row in probs]
    naive = ref.switch_balance_loss(probs, chosen, 4).item()
    assert got == pytest.approx(hf, rel=1e-6)
    assert got == pytest.approx(naive, rel=1e-6)


# ---------------------------------------------------------------------------- topology

TOPOLOGY_CASES = {
    # id: (overrides, norm position, parallel (True, or "shared": one norm for both branches), tied)
    "pre_tied": ([], "pre", False, True),
    "pre_untied": (["model.tie_embeddings=false"], "pre", False, False),
    "post_layernorm": (["topology.norm_position=post", "norm=layernorm"], "post", False, True),
    "post_untied_sinusoidal": (["topology.norm_position=post", "model.tie_embeddings=false",
                                "position=sinusoidal", "activation=gelu"], "post", False, False),
    "parallel": (["topology.parallel_residual=true"], "pre", True, True),
    "parallel_untied": (["topology.parallel_residual=true", "model.tie_embeddings=false"], "pre", True, False),
    # One LayerNorm feeding both branches (Falcon-7B, Phi-2, GPT-J), MQA, an untied head.
    "parallel_shared_norm": (["topology.parallel_residual=true", "topology.shared_norm=true", "norm=layernorm",
                              "attention=mqa", "model.tie_embeddings=false"], "pre", "shared", False),
    "gpt2_like": (["position=learned", "norm=layernorm", "activation=gelu_tanh", "attention=mha",
                   "model.attention_bias=true", "model.mlp_bias=true"], "pre", False, True),
    "moe_untied": (["ffn=moe", "model.n_experts=4", "model.ffn_dim=24", "model.tie_embeddings=false"],
                   "pre", False, False),
    "gemma_like": (["norm.offset=1.0", "topology.scale_embeddings=true", "activation=geglu_tanh", "attention=mqa",
                    "model.head_dim=24"], "pre", False, True),
    "sandwich_softcap_untied": (["topology.norm_position=sandwich", "topology.final_logit_softcap=5.0",
                                 "model.tie_embeddings=false"], "sandwich", False, False),
    "logit_scale_shared_norm": (["topology.parallel_residual=true", "topology.shared_norm=true", "norm=layernorm",
                                 "norm.bias=false", "model.rope_interleaved=true", "topology.logit_scale=0.0625"],
                                "pre", "shared", True),
    "gemma2_like": (["topology.norm_position=sandwich", "topology.final_logit_softcap=5.0", "norm.offset=1.0",
                     "topology.scale_embeddings=true", "activation=geglu_tanh"], "sandwich", False, True),
    "post_output": (["topology.norm_position=post_output"], "post_output", False, True),
    "olmo2_like": (["topology.norm_position=post_output", "model.qk_norm=true", "model.qk_norm_scope=whole",
                    "model.tie_embeddings=false"], "post_output", False, False),
    "olmo_like": (["norm=layernorm", "norm.affine=false", "norm.bias=false", "model.tie_embeddings=false"],
                  "pre", False, False),
    "granite_like": (["topology.embedding_multiplier=3.0", "topology.residual_multiplier=0.5",
                      "topology.logit_divisor=4.0", "model.attention_scale=0.3"], "pre", False, True),
    "multipliers_parallel": (["topology.parallel_residual=true", "topology.residual_multiplier=0.7",
                              "topology.embedding_multiplier=2.0"], "pre", True, True),
    "multipliers_post_output": (["topology.norm_position=post_output", "topology.residual_multiplier=0.7",
                                 "topology.logit_divisor=2.0", "model.tie_embeddings=false"],
                                "post_output", False, False),
    "multipliers_post": (["topology.norm_position=post", "topology.residual_multiplier=0.7"], "post", False, True),
}


def reference_decoder(model, ids, norm_position, parallel, tied):
    """The decoder-only wiring recomputed by hand from the model's own (separately tested) submodules."""
    positions = torch.arange(ids.shape[-1])
    x = model.embed.tokens.weight[ids]
    if model.spec.params["topology"].scale_embeddings:
        x = x * math.sqrt(model.spec.model.d_model)
    topology = model.spec.params["topology"]
    if topology.embedding_multiplier is not None:
        x = x * topology.embedding_multiplier
    m = topology.residual_multiplier if topology.residual_multiplier is not None else 1.0
    x = model.position.embed(x, positions)
    pos = model.position.attention_inputs(positions)
    aux = None
    for block in model.decoder.blocks:
        if parallel == "shared":
            assert block.ffn_norm is None
            h = block.attn_norm(x)
            f = block.ffn(h)
            x = x + block.attn(h, pos) + f.output
        elif parallel:
            f = block.ffn(block.ffn_norm(x))
            x = x + m * block.attn(block.attn_norm(x), pos) + m * f.output
        elif norm_position == "pre":
            h = x + m * block.attn(block.attn_norm(x), pos)
            f = block.ffn(block.ffn_norm(h))
            x = h + m * f.output
        elif norm_position == "sandwich":
            h = x + m * block.attn_post_norm(block.attn(block.attn_norm(x), pos))
            f = block.ffn(block.ffn_norm(h))
            x = h + m * block.ffn_post_norm(f.output)
        elif norm_position == "post_output":
            h = x + m * block.attn_norm(block.attn(x, pos))
            f = block.ffn(h)
            x = h + m * block.ffn_norm(f.output)
        else:
            h = block.attn_norm(x + m * block.attn(x, pos))
            f = block.ffn(h)
            x = block.ffn_norm(h + m * f.output)
        if f.aux_loss is not None:
            aux = f.aux_loss if aux is None else aux + f.aux_loss
    if norm_position in ("pre", "sandwich", "post_output"):
        x = model.decoder.final_norm(x)
    head = model.embed.tokens.weight if tied else model.head.weight
    logits = x @ head.transpose(0, 1)
    if topology.logit_divisor is not None:
        logits = logits / topology.logit_divisor
    scale = topology.logit_scale
    if scale is not None:
        logits = logits * scale
    cap = model.spec.params["topology"].final_logit_softcap
    return (logits if cap is None else cap * torch.tanh(logits / cap)), aux


@pytest.mark.parametrize("case", list(TOPOLOGY_CASES))
def test_decoder_only(case):
    overrides, norm_position, parallel, tied = TOPOLOGY_CASES[case]
    model = lc.build(lc.compose([*TINY, *overrides]))
    assert (model.head.weight is None) == tied
    assert isinstance(model.decoder.final_norm, nn.Identity) == (norm_position == "post")
    randomize_(model.double(), std=0.2)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(3))
    out = model(ids)
    want_logits, want_aux = reference_decoder(model, ids, norm_position, parallel, tied)
    torch.testing.assert_close(out.logits, want_logits, **TIGHT)
    assert (out.aux_loss is None) == (want_aux is None) == ("moe" not in case)
    if want_aux is not None:
        torch.testing.assert_close(out.aux_loss, want_aux, **TIGHT)
    # Gradients of every parameter through both wirings.
    g = randn(*want_logits.shape, seed=9)
    params = list(model.parameters())

    def loss(logits, aux):
        return (logits * g).sum() + (aux if aux is not None else 0.0)

    got = torch.autograd.grad(loss(*model(ids)), params)
    want = torch.autograd.grad(loss(*reference_decoder(model, ids, norm_position, parallel, tied)), params)
    for (name, _), a, e in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, e, **TIGHT, msg=lambda m, name=name: f"gradient of {name}:\n{m}")


@pytest.mark.parametrize("start, length", [(0, 64), (0, 65), (60, 10), (200, 8)])
def test_rope_dynamic_ntk_threshold_is_the_highest_position(start, length):
    """transformers scales once the highest position + 1 passes max_position_embeddings
    (its dynamic rope update), whatever the number of positions: offset positions too."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    pe = make_ctx("model.head_dim=64", "model.rope_scaling={type:dynamic,factor:4,original_max_seq_len:64}"
                  ).shared("position")
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=64,
                         rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": pe.params.theta})
    positions = torch.arange(start, start + length)
    theirs, _ = LlamaRotaryEmbedding(config)(torch.zeros(1, length, 64), positions[None])  # fresh: no cached growth
    ours, _ = pe.attention_inputs(positions).rotary
    torch.testing.assert_close(ours, theirs[0], rtol=0, atol=1e-4)  # float32 angles of positions ~200
    scaled = start + length > 64
    unscaled, _ = make_ctx("model.head_dim=64").shared("position").attention_inputs(positions).rotary
    assert torch.allclose(ours, unscaled, atol=1e-6) != scaled
