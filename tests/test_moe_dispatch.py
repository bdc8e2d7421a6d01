"""Grouped dispatch in the `moe` plugin: every router variant against the dense
all-experts formula (every expert on every token, its biases included, combined with
mostly-zero routing weights) on outputs and gradients, eager and compiled with fullgraph;
skewed routing (idle experts, one expert taking every token); the grouped
product itself (custom op registration, empty groups, rows in no group); and
bf16 through torch._grouped_mm."""

from __future__ import annotations

import pytest
import torch

from llmarch_compose.registry.ffn import grouped_mm as gmm
from llmarch_compose.registry.ffn.dense import gated_product
from llmarch_compose.registry.ffn.moe import dispatch, kept_slots
from test_plugin_numerics import ACTIVATION_CASES, ROUTER_FP32, assert_close, make_ctx, randn, randomize_

E, D, HIDDEN = 8, 64, 24  # experts, d_model (conftest's TINY), each expert's width
BATCH, SEQ = 2, 12

VARIANTS = {
    "softmax_top2": ["ffn=moe", "activation=swiglu"],
    "sigmoid_groups_shared": ["ffn=deepseek_moe", "model.n_expert_groups=4", "model.topk_expert_groups=2",
                              "model.experts_per_token=3", "model.n_shared_experts=1",
                              "model.routed_scaling_factor=2.5"],
    "qwen_shared_gated": ["ffn=qwen_moe", "model.n_shared_experts=2", "activation=gelu"],
    "switch_capacity_zero": ["ffn=switch_moe", "ffn.capacity=2", *ACTIVATION_CASES["relu"]],
    "top2_capacity_identity": ["ffn=moe", "model.expert_capacity_factor=0.75", "ffn.dropped=identity",
                               *ACTIVATION_CASES["geglu"]],
    # gpt-oss's expert and router biases and clamped SwiGLU, with capacity drops (rows in no expert)
    "biased_capacity_identity": ["ffn=gpt_oss_moe", "activation=swiglu_clamped", "activation.limit=1.0",
                                 "model.expert_capacity_factor=0.75", "ffn.dropped=identity"],
}


def build(name: str, dtype=torch.float64, extra=()):
    overrides = [f"model.n_experts={E}", "model.experts_per_token=2", f"model.ffn_dim={HIDDEN}",
                 "model.router_aux_loss_coef=0.05", *VARIANTS[name], *extra]
    moe = randomize_(make_ctx(*overrides).build("ffn", layer_idx=0).to(dtype), std=0.3)
    if moe.score_bias is not None:
        moe.score_bias.copy_(randn(E, seed=7) * 0.1)
    return moe


def dense_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """The all-experts formula, with the module's own routing and capacity rule,
    computed in x's dtype from the module's weights cast to it."""
    w_in, w_out = moe.w_in.to(x.dtype), moe.w_out.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    r = moe.route(flat.to(moe.w_in.dtype))
    weights, dropped = r.weights, None
    capacity = moe.slot_capacity(x.shape[-2])
    if capacity is not None:
        keep = kept_slots(r.chosen, moe.num_experts, x.shape[-2], capacity)
        weights = torch.where(keep, r.weights, torch.zeros_like(r.weights))
        dropped = r.weights - weights if moe.dropped == "identity" else None
    combine = torch.zeros_like(r.scores).scatter(1, r.chosen, weights).to(x.dtype)
    h = torch.einsum("td,edf->etf", flat, w_in)
    out_bias = 0
    if moe.in_bias is not None:  # every expert's biases, on every token
        h, out_bias = h + moe.in_bias.to(x.dtype)[:, None], moe.out_bias.to(x.dtype)[:, None]
    y = torch.einsum("etd,te->td", torch.bmm(gated_product(moe.activation, h), w_out) + out_bias, combine)
    if dropped is not None:
        y = y + dropped.sum(dim=-1, keepdim=True).to(x.dtype) * flat
    if moe.shared is not None:
        y = y + moe._shared_output(flat.to(moe.w_in.dtype)).to(x.dtype)
    return y.reshape(x.shape)


def outputs_and_grads(fn, moe, x, g):
    """fn(x) and the gradients of sum(fn(x) * g) w.r.t. x and every parameter."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    params = [p for _, p in moe.named_parameters()]
    return out, torch.autograd.grad(out, [x, *params], g)


def check_against_dense(moe, fn, x, tol=ROUTER_FP32):
    g = randn(*x.shape, seed=1234, dtype=x.dtype)
    got, got_grads = outputs_and_grads(fn, moe, x, g)
    want, want_grads = outputs_and_grads(lambda t: dense_reference(moe, t), moe, x, g)
    assert_close(got, want, tol, "forward")
    names = ["input", *(n for n, _ in moe.named_parameters())]
    for name, a, e in zip(names, got_grads, want_grads):
        assert_close(a, e, tol, f"gradient of {name}")


def assert_drops_some(moe, x):
    """A capacity case must really drop slots, or it tests nothing."""
    capacity = moe.slot_capacity(x.shape[-2])
    if capacity is not None:
        with torch.no_grad():
            chosen = moe.route(x.reshape(-1, D).to(moe.w_in.dtype)).chosen
        assert not kept_slots(chosen, E, x.shape[-2], capacity).all()


# --------------------------------------------------------------------- variants


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eager_matches_dense_formula(name):
    moe = build(name)
    x = randn(BATCH, SEQ, D)
    assert_drops_some(moe, x)
    check_against_dense(moe, lambda t: moe(t).output, x)


#: Inductor compiles cost seconds each, so two variants that between them take every
#: code path (groups, sigmoid, shared experts, capacity masks) go through Inductor;
#: the others are traced whole (fullgraph, forward and backward graphs) and run eagerly.
COMPILE_BACKEND = {"sigmoid_groups_shared": "inductor", "top2_capacity_identity": "inductor"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_compiled_fullgraph_matches_dense_formula(name):
    moe = build(name)
    compiled = torch.compile(moe, fullgraph=True, backend=COMPILE_BACKEND.get(name, "aot_eager"))
    x = randn(BATCH, SEQ, D)
    assert_drops_some(moe, x)
    check_against_dense(moe, lambda t: compiled(t).output, x)
    # other data routes differently; the group sizes must not be baked into the graph
    with torch._dynamo.config.patch(error_on_recompile=True):
        check_against_dense(moe, lambda t: compiled(t).output, randn(BATCH, SEQ, D, seed=3))


# ----------------------------------------------------------------- skewed routing


def skewed_moe():
    """Softmax routing whose selection bias sends every token to experts 0 and 1."""
    moe = build("softmax_top2", extra=["ffn.bias_update_rate=0.01"])
    moe.score_bias.copy_(torch.tensor([10.0, 5.0] + [-10.0] * (E - 2)))
    return moe


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_idle_experts_and_one_expert_taking_every_token(compiled):
    moe = skewed_moe()
    x = randn(BATCH, SEQ, D)
    tokens = BATCH * SEQ
    with torch.no_grad():
        plan = dispatch(moe.route(x.reshape(-1, D)).chosen, E)
    assert plan.offsets.tolist() == [tokens, 2 * tokens] + [2 * tokens] * (E - 2)  # expert 0 takes all
    run = torch.compile(moe, fullgraph=True, backend="aot_eager") if compiled else moe
    check_against_dense(moe, lambda t: run(t).output, x)
    run(x).output.square().sum().backward()
    assert moe.w_in.grad[2:].abs().max() == 0 and moe.w_out.grad[2:].abs().max() == 0
    assert moe.w_in.grad[:2].abs().min(dim=-1).values.min() > 0  # the busy experts learn


def test_dispatch_sorts_slots_by_expert_in_token_order():
    chosen = torch.tensor([[2, 0], [0, 3], [2, 1]])
    keep = torch.tensor([[True, True], [False, True], [True, True]])
    plan = dispatch(chosen, 4, keep)
    # rows: expert 0 <- slot (0,1); expert 1 <- (2,1); expert 2 <- (0,0), (2,0); expert 3 <- (1,1); dropped (1,0)
    assert plan.token.tolist() == [0, 2, 0, 2, 1, 1]
    assert plan.offsets.tolist() == [1, 2, 4, 5]
    slots = torch.tensor([1, 5, 0, 4, 3, 2])  # flattened (token, choice) held by each row
    assert torch.equal(plan.inverse[slots], torch.arange(6))


# ---------------------------------------------------------------- grouped product


def naive_grouped(rows, weights, ends):
    out, start = torch.zeros(rows.shape[0], weights.shape[-1], dtype=rows.dtype), 0
    for group, end in enumerate(ends):
        out[start:end] = rows[start:end] @ weights[group]
        start = end
    return out


def test_grouped_mm_loop_empty_groups_and_rows_in_no_group():
    rows, weights = randn(11, 5), randn(4, 5, 3, seed=1)
    offsets = torch.tensor([0, 4, 4, 9], dtype=torch.int32)  # groups 0 and 2 empty, rows 9-10 in none
    rows.requires_grad_(), weights.requires_grad_()
    out = gmm.grouped_mm(rows, weights, offsets)
    torch.testing.assert_close(out, naive_grouped(rows, weights, offsets.tolist()), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda r, w: gmm.grouped_mm(r, w, offsets), (rows, weights))
    torch.library.opcheck(gmm.grouped_mm_loop, (rows, weights, offsets))


# -------------------------------------------------------------------------- bf16


@pytest.mark.slow
def test_bf16_goes_through_fused_grouped_mm(monkeypatch):
    calls = []
    fused = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or fused(*a, **k))
    moe = build("top2_capacity_identity", dtype=torch.bfloat16)
    x = randn(BATCH, SEQ, D, dtype=torch.bfloat16)
    out = moe(x).output
    assert calls == [torch.bfloat16, torch.bfloat16]
    tol = dict(rtol=3e-2, atol=3e-2, atol_per_max=2e-2)
    assert_close(out.float(), dense_reference(moe, x.float()), tol, "bf16 forward")
    monkeypatch.undo()
    compiled = torch.compile(moe, fullgraph=True)
    assert_close(compiled(x).output.float(), dense_reference(moe, x.float()), tol, "bf16 compiled forward")
    for run in (moe, compiled):
        got = torch.autograd.grad(run(x).output.float().square().sum(), moe.w_in)[0]
        want = torch.autograd.grad(dense_reference(moe, x.float()).square().sum(), moe.w_in)[0]
        assert_close(got.float(), want.float(), tol, "bf16 gradient")


def test_bf16_rows_the_fused_kernel_cannot_align_take_the_loop(monkeypatch):
    monkeypatch.setattr(torch, "_grouped_mm", None)  # must not be called: 5 bf16 columns are 10 bytes
    rows, weights = randn(7, 5, dtype=torch.bfloat16), randn(2, 5, 3, seed=1, dtype=torch.bfloat16)
    offsets = torch.tensor([3, 7], dtype=torch.int32)
    want = naive_grouped(rows.double(), weights.double(), [3, 7])
    torch.testing.assert_close(gmm.grouped_mm(rows, weights, offsets).double(), want, rtol=2e-2, atol=2e-2)


def test_under_autocast_both_operands_take_its_dtype():
    """bf16 rows (an autocast product's output) against fp32 expert weights: the grouped
    product runs in bf16 as `torch.mm` would under autocast, and the fp32 weights get
    their gradient."""
    rows = randn(8, 16, dtype=torch.bfloat16)
    weights = randn(2, 16, 8, seed=1, dtype=torch.float32).requires_grad_()
    offsets = torch.tensor([3, 8], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gmm.grouped_mm(rows, weights, offsets)
        want = torch.cat([rows[:3] @ weights[0], rows[3:] @ weights[1]])  # autocast's mm
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.float().sum().backward()
    assert weights.grad is not None and weights.grad.dtype == torch.float32
