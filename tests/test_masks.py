"""Mask and score functions and the two attention kernels that run them.

Every mask/score combination goes through each back end (SDPA with dense tensors
from the functions, FlexAttention with a block mask; eager and compiled) and is
checked against a masked softmax written out here with Python loops. Backward is
checked where the back end has one (FlexAttention has none on CPU). Model-level
tests check that the stack builds a block mask once per forward and spec, not per
layer, and that compiled FlexAttention inference matches the eager SDPA path.
"""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmarch_compose as lc
import llmarch_compose.model.masks as masks
from llmarch_compose import ConfigError, PositionInputs
from llmarch_compose.model.masks import BlockMasks, MaskSpec
from llmarch_compose.registry.attention.gqa import scaled_dot_product
from llmarch_compose.registry.position.alibi import alibi_slopes

from conftest import TINY

B, H, KV, T, D = 2, 4, 2, 40, 8
BLOCK = 16  # small blocks so that windows and prefixes leave whole blocks out at T = 40
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def allowed_loops(t: int, causal: bool, window: Optional[int], prefix: Optional[list[int]]) -> torch.Tensor:
    """[batch, 1, t, t]: query i may see key j (written out, independent of masks.py)."""
    rows = []
    for bi in range(B):
        table = []
        for i in range(t):
            row = []
            for j in range(t):
                ok = (not causal or j <= i) and (window is None or abs(i - j) < window)
                if prefix is not None and (causal or window is not None) and j < prefix[bi]:
                    ok = True
                row.append(ok)
            table.append(row)
        rows.append(table)
    return torch.tensor(rows)[:, None]


def bias_loops(t: int, slopes: Optional[list[float]], table: Optional[torch.Tensor]) -> torch.Tensor:
    """[1 or batch, heads, t, t] additive bias: -slope_h |i - j| plus table entries."""
    out = torch.zeros(H, t, t, dtype=torch.float64)
    if slopes is not None:
        for h in range(H):
            for i in range(t):
                for j in range(t):
                    out[h, i, j] -= slopes[h] * abs(i - j)
    out = out[None]
    return out if table is None else out + table.double()


def naive_attention(q, k, v, allowed, bias, cap: Optional[float]) -> torch.Tensor:
    """Scaled scores, plus bias, then the cap, then softmax over the allowed keys, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D) + bias.to(q.device)
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


# name: (causal, window, prefix, alibi, bias table, softcap)
CASES = {
    "causal": (True, None, False, False, False, None),
    "full": (False, None, False, False, False, None),
    "window": (True, 5, False, False, False, None),
    "window_bidirectional": (False, 5, False, False, False, None),
    "prefix": (True, None, True, False, False, None),
    "alibi": (True, None, False, True, False, None),
    "bias_table": (False, None, False, False, True, None),
    "bias_table_batched": (True, None, False, False, "batched", None),
    "softcap": (True, None, False, False, False, 2.0),
    "everything": (True, 7, True, True, True, 1.5),
}


def make_case(name: str, device: str, grad: bool):
    causal, window, prefix, use_alibi, table, cap = CASES[name]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    # A transposed view of one projection, as the layers hand it over.
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2).to(device).requires_grad_(grad) for x in (q, k, v))
    prefix_list = [3, 21] if prefix else None
    slopes = alibi_slopes(H) if use_alibi else None
    bias = None
    if table:
        shape = (B, H, T, T) if table == "batched" else (H, T, T)
        bias = torch.randn(*shape, generator=g).to(device).requires_grad_(grad)
    pos = PositionInputs(bias=bias, prefix_len=torch.tensor(prefix_list, device=device) if prefix else None,
                         slopes=torch.tensor(slopes, device=device) if slopes else None)
    spec = MaskSpec(causal, window, cap)
    want = naive_attention(q, k, v, allowed_loops(T, causal, window, prefix_list),
                           bias_loops(T, slopes, None if bias is None else bias.detach()), cap)
    return q, k, v, pos, spec, want, bias


def with_block_mask(pos: PositionInputs, spec: MaskSpec, device: str) -> PositionInputs:
    built = BlockMasks(block_size=BLOCK).for_forward([spec], B, T, T, device, pos.prefix_len, pos.slopes, pos.bias)
    return pos._replace(block_masks=built)


def check_backward(q, k, v, bias, got, case_name, device):
    """Gradients of a random projection of the output against the naive reference's."""
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(got.shape, generator=g).to(device)
    leaves = [t for t in (q, k, v, bias) if t is not None]
    grads = torch.autograd.grad((got * probe).sum(), leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rbias = ref_leaves[3] if bias is not None else None
    causal, window, prefix, use_alibi, _, cap = CASES[case_name]
    want = naive_attention(rq, rk, rv, allowed_loops(T, causal, window, [3, 21] if prefix else None),
                           bias_loops(T, alibi_slopes(H) if use_alibi else None, rbias), cap)
    want_grads = torch.autograd.grad((want * probe.double()).sum(), ref_leaves)
    for name, a, b in zip("qkvb", grads, want_grads):
        torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sdpa_path_eager_forward_backward(case, device):
    """No block mask: SDPA with the dense mask and bias from the same functions (or
    the written-out scores under a softcap); gradients reach q, k, v and a bias table."""
    q, k, v, pos, spec, want, bias = make_case(case, device, grad=True)
    got = scaled_dot_product(q, k, v, pos, spec, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    check_backward(q, k, v, bias, got, case, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_flex_path_forward(case, device):
    """FlexAttention with the block mask the stack would build: eager here (its reference,
    cheap to run for every case); the compiled kernel is checked below (CPU: inference only)."""
    grad = device != "cpu"
    q, k, v, pos, spec, want, bias = make_case(case, device, grad=grad)
    pos = with_block_mask(pos, spec, device)
    if not masks.is_plain(spec, pos.prefix_len, pos.slopes, pos.bias):
        assert pos.block_masks, "a non-plain spec must get a block mask"
    got = scaled_dot_product(q, k, v, pos, spec, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if grad:
        check_backward(q, k, v, bias, got, case, device)


COMPILED_CASES = [(case, device) for device in DEVICES for case in sorted(CASES)
                  if device != "cpu" or case in ("window", "everything")]


@pytest.mark.slow
@pytest.mark.parametrize("case,device", COMPILED_CASES)
def test_flex_path_compiled(case, device):
    """The fused, block-sparse FlexAttention kernel (Inductor, fullgraph): on CPU a window alone
    and every function at once (window, prefix, ALiBi, a bias table, a softcap), inference only;
    on CUDA every case, and backward."""
    grad = device != "cpu"
    q, k, v, pos, spec, want, bias = make_case(case, device, grad=grad)
    pos = with_block_mask(pos, spec, device)
    got = torch.compile(scaled_dot_product, fullgraph=True)(q, k, v, pos, spec, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    if grad:
        check_backward(q, k, v, bias, got, case, device)


@pytest.mark.slow
def test_sdpa_path_compiled_forward_backward():
    """CPU training compiles the SDPA path: the combination of every function, forward and backward."""
    q, k, v, pos, spec, want, bias = make_case("everything", "cpu", grad=True)
    got = torch.compile(scaled_dot_product, fullgraph=True)(q, k, v, pos, spec, None)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    check_backward(q, k, v, bias, got, "everything", "cpu")


def test_cpu_with_gradients_never_takes_flex():
    """Handed a block mask while q needs gradients on CPU, the layer still runs SDPA (flex has no CPU backward)."""
    q, k, v, pos, spec, want, bias = make_case("window", "cpu", grad=True)
    got = scaled_dot_product(q, k, v, with_block_mask(pos, spec, "cpu"), spec, None)
    check_backward(q, k, v, bias, got, "window", "cpu")


# ------------------------------------------------------------- the functions alone


@settings(max_examples=25, deadline=None)
@given(t=st.integers(1, 48), causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 20)),
       prefix=st.one_of(st.none(), st.lists(st.integers(0, 48), min_size=B, max_size=B)))
def test_dense_mask_and_block_mask_match_the_loops(t, causal, window, prefix):
    """The dense mask is the loop table, and the block mask keeps exactly the blocks
    that hold an allowed entry (so flex skips only empty blocks)."""
    spec = MaskSpec(causal, window)
    prefix_len = torch.tensor(prefix) if prefix is not None else None
    want = allowed_loops(t, causal, window, prefix)
    mask_mod = masks.spec_mask(spec, t, t, prefix_len)
    got = masks.dense_mask(mask_mod, B, t, t, "cpu") if mask_mod is not None else torch.ones(1, 1, t, t, dtype=bool)
    assert torch.equal(got.expand(B, 1, t, t), want)
    blocks = BlockMasks(block_size=BLOCK).build(spec, B, t, t, "cpu", prefix_len).to_dense()
    n = -(-t // BLOCK)
    padded = torch.zeros(B, 1, n * BLOCK, n * BLOCK, dtype=torch.bool)
    padded[..., :t, :t] = want
    occupied = padded.unflatten(2, (n, BLOCK)).unflatten(4, (n, BLOCK)).any(dim=(3, 5))
    assert torch.equal(blocks.bool().expand_as(occupied), occupied)


@settings(max_examples=20, deadline=None)
@given(t=st.integers(1, 24), offset=st.integers(0, 8), cap=st.floats(0.5, 50.0))
def test_score_functions_dense_equal_their_definitions(t, offset, cap):
    """dense_bias evaluates a score function on index grids: ALiBi is -slope |q + offset - k|,
    a table is looked up, and chained functions apply in order (softcap last)."""
    slopes = torch.tensor(alibi_slopes(H))
    table = torch.randn(H, t, t + offset, generator=torch.Generator().manual_seed(t))
    k_len = t + offset
    got = masks.dense_bias(masks.chain(masks.alibi(slopes, offset), masks.bias_table(table)), 1, H, t, k_len,
                           "cpu", torch.float32)
    i = torch.arange(t)[:, None] + offset
    j = torch.arange(k_len)[None]
    want = -slopes[:, None, None] * (i - j).abs() + table
    torch.testing.assert_close(got[0], want)
    scores = torch.randn(1, H, t, k_len)
    capped = masks.chain(masks.bias_table(table), masks.softcap(cap))(scores, *masks.index_grid(1, H, t, k_len, "cpu"))
    torch.testing.assert_close(capped, cap * torch.tanh((scores + table) / cap))
    assert capped.abs().max() <= cap


def test_softcap_must_be_positive():
    with pytest.raises(ConfigError, match="attention.softcap"):
        lc.build(lc.compose([*TINY, "attention.softcap=0"]), device="meta")


# ------------------------------------------------------------------- whole models


PATTERN = "model.layer_pattern=[{every:2,offset:1,attention:{window:3}}]"
MODELS = {
    "swa_pattern_alibi": ([PATTERN, "model.n_layers=4", "position=alibi"], None),
    "swa": (["attention=swa", "model.window=5"], None),
    "prefix": (["topology=prefix_decoder"], [4, 11]),
    "relative_bias": (["position=relative_bias", "attention=mha"], None),
    "mla_window": (["attention=mla", "attention.window=5"], None),
    "softcap_t5_encoder_decoder": (["model=t5_small", "attention.softcap=3.0"], None),
}


class CountingBuilds:
    """Counts create_block_mask calls made through the stack's BlockMasks."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = masks.create_block_mask

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(masks, "create_block_mask", counted)


def tiny_model(overrides):
    torch.manual_seed(0)
    model = lc.build(lc.compose([*TINY, "model.max_seq_len=32", *overrides])).eval()
    for p in model.parameters():  # weights large enough that every mask and bias visibly matters
        torch.nn.init.normal_(p, std=0.2)
    return model


def run(model, ids, prefix):
    return model(ids, prefix_len=torch.tensor(prefix)) if prefix else model(ids)


def compile_blocks(model, backend: str = "aot_eager"):
    """Regional compilation as lc.compile does it; aot_eager traces the same graphs (block
    masks passed in, flex chosen) without Inductor's slow CPU kernel builds."""
    for block in model.compile_regions():
        block.compile(backend=backend, fullgraph=True)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiled_flex_inference_matches_eager_sdpa(name, monkeypatch):
    """Compiled inference takes FlexAttention (block masks built), eager takes SDPA; same logits."""
    overrides, prefix = MODELS[name]
    model = tiny_model(overrides)
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(2))
    builds = CountingBuilds(monkeypatch)
    with torch.no_grad():
        want = run(model, ids, prefix).logits
        assert builds.calls == 0  # eager: SDPA, no block mask
        got = run(compile_blocks(model), ids, prefix).logits
    assert builds.calls > 0
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_inductor_compiled_model_with_bias_table_matches_eager(monkeypatch):
    """The real compile stage (lc.compile, Inductor): T5 buckets and a prefix through fused FlexAttention."""
    model = tiny_model(["position=relative_bias", "topology=prefix_decoder"])
    ids = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    builds = CountingBuilds(monkeypatch)
    with torch.no_grad():
        want = model(ids, prefix_len=torch.tensor([5, 13])).logits
        got = lc.compile(model)(ids, prefix_len=torch.tensor([5, 13])).logits
    assert builds.calls == 1
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.slow
def test_block_masks_built_once_per_forward_not_per_layer(monkeypatch):
    """Four layers, two specs (windowed and plain causal, both with ALiBi): two builds per
    new shape, none for a repeated shape; a per-batch prefix is built each forward."""
    model = compile_blocks(tiny_model([PATTERN, "model.n_layers=4", "position=alibi"]))
    builds = CountingBuilds(monkeypatch)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        model(ids)
        assert builds.calls == 2
        model(ids)
        assert builds.calls == 2
        model(ids[:, :12])
        assert builds.calls == 4
    prefix_model = compile_blocks(tiny_model(["topology=prefix_decoder", PATTERN, "model.n_layers=4"]))
    builds.calls = 0
    with torch.no_grad():
        for _ in range(2):
            prefix_model(ids, prefix_len=torch.tensor([3, 9]))
    assert builds.calls == 4  # two specs, each forward


@pytest.mark.slow
def test_plain_causal_and_cpu_training_build_no_block_mask(monkeypatch):
    """The default path (RoPE, causal) runs SDPA's own causal kernel; CPU training with a
    window runs SDPA with a dense mask, compiled, with gradients equal to eager's."""
    builds = CountingBuilds(monkeypatch)
    with torch.no_grad():
        compile_blocks(tiny_model([]))(torch.randint(0, 128, (2, 20)))
    assert builds.calls == 0
    eager = tiny_model(["attention=swa", "model.window=5"]).train()
    compiled = compile_blocks(tiny_model(["attention=swa", "model.window=5"]).train())
    ids = torch.randint(0, 128, (2, 20))
    for m in (eager, compiled):
        m(ids).logits.square().mean().backward()
    assert builds.calls == 0
    named = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_whole_model_compile_on_cpu_keeps_sdpa(monkeypatch):
    """Compiling the whole model (not regionally) on CPU runs SDPA: torch's CPU flex kernel
    cannot read a score bias computed inside the same graph (masks.flex_runs)."""
    model = tiny_model(["attention=swa", "model.window=5", "position=relative_bias"])
    ids = torch.randint(0, 128, (2, 20))
    builds = CountingBuilds(monkeypatch)
    with torch.no_grad():
        want = model(ids).logits
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert builds.calls == 0
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


class IgnoresMasks(lc.Attention):
    """A third-party attention that knows nothing of mask specs or block masks."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, pos):
        return self.proj(x)


def test_attention_without_a_mask_spec_asks_for_none():
    assert IgnoresMasks().mask_spec() is None
