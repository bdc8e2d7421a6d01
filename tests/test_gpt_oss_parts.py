"""gpt-oss's components, each against a reference that is not the code under test:

- attention sinks (`attention.sinks`) in every kernel path of the shared attention (SDPA
  with its extra key slot, the dense mask and bias, the written-out scores under a softcap,
  FlexAttention's log-sum-exp rescaling) against a naive softmax-with-sink written here,
  and the whole layer against transformers' GptOssAttention (eager) on the same weights;
- the clamped SwiGLU (`activation=swiglu_clamped`) against GptOssExperts' own gate;
- the biased MoE (`ffn=gpt_oss_moe`: expert and router biases) against GptOssMLP,
  GptOssTopKRouter's softmax over the top-k logits against our renormalized top-k of
  the softmax, and the fused bf16 grouped kernel with the biases;
- the card's counts, config validation and interop refusals by key;
- slow: a tiny model with all of them (a windowed layer among them) compiled fullgraph
  against eager, cached decoding against the full forward, and activation checkpointing
  against the gradients without it.
"""

from __future__ import annotations

import copy

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError, PositionInputs
from llmarch_compose.model.cache import DecodeInputs, KVBuffer, attend_cached
from llmarch_compose.model.card import architecture_card
from llmarch_compose.model.masks import BlockMasks, MaskSpec, flex_computes
from llmarch_compose.registry.attention.gqa import scaled_dot_product
from llmarch_compose.registry.ffn.moe import expert_weights
from llmarch_compose.testing import build_with, check_compiled, check_decoding, loss_of
from llmarch_compose.train import recompute
from test_plugin_numerics import FP32_INSIDE, ROUTER_FP32, TIGHT, assert_close, make_ctx, randn, randomize_

F64 = torch.float64
B, H, KV, T, HEAD = 2, 4, 2, 9, 8


# ------------------------------------------------------------------- the reference


def allowed(t: int, causal: bool, window) -> torch.Tensor:
    """[t, t]: query i may see key j (the rules written out pair by pair)."""
    return torch.tensor([[(not causal or j <= i) and (window is None or abs(i - j) < window) for j in range(t)]
                         for i in range(t)])


def naive_sink_attention(q, k, v, sinks, see, scale=None, cap=None, bias=None):
    """softmax over [scores of the keys it sees..., its head's sink]; the sink's share goes to no value."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if bias is not None:
        scores = scores + bias
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores.masked_fill(~see, float("-inf"))
    if sinks is not None:
        scores = torch.cat((scores, sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)), dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., :-1] if sinks is not None else probs) @ v


def alibi_bias(slopes: torch.Tensor, t: int) -> torch.Tensor:
    distance = (torch.arange(t)[:, None] - torch.arange(t)[None, :]).abs()
    return -slopes.view(-1, 1, 1) * distance


#: case -> (causal, window, softcap, ALiBi, kv heads): which path of scaled_dot_product it takes
CASES = {
    "full": (False, None, None, False, KV),  # no mask: SDPA with the sink slot
    "causal": (True, None, None, False, KV),  # plain causal would be SDPA's own: sinks force the dense path
    "causal_mha": (True, None, None, False, H),
    "window": (True, 3, None, False, KV),
    "bidirectional_window": (False, 3, None, False, KV),
    "softcap": (True, 3, 2.0, False, KV),  # scores written out
    "alibi": (True, None, None, True, 1),  # dense bias + sink slot
    "everything": (True, 3, 2.0, True, KV),
}


def make_case(name: str, dtype=F64):
    causal, window, cap, use_alibi, kv = CASES[name]
    q = randn(B, H, T, HEAD, seed=1, dtype=dtype)
    k, v = randn(B, kv, T, HEAD, seed=2, dtype=dtype), randn(B, kv, T, HEAD, seed=3, dtype=dtype)
    sinks = randn(H, seed=4, dtype=dtype, scale=1.5)
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=dtype) if use_alibi else None
    pos = PositionInputs(slopes=slopes)
    spec = MaskSpec(causal, window, cap, sinks=True)
    bias = alibi_bias(slopes, T) if use_alibi else None
    return (q, k, v, sinks), pos, spec, (allowed(T, causal, window), cap, bias)


@pytest.mark.parametrize("case", list(CASES))
def test_sinks_dense_paths_forward_and_backward(case):
    """No block mask (CPU, or gradients): every dense path against the naive reference,
    gradients reaching q, k, v and the sinks."""
    tensors, pos, spec, (see, cap, bias) = make_case(case)
    xa = [t.clone().requires_grad_() for t in tensors]
    xr = [t.clone().requires_grad_() for t in tensors]
    got = scaled_dot_product(*xa[:3], pos, spec, None, xa[3])
    want = naive_sink_attention(*xr, see, cap=cap, bias=bias)
    tol = TIGHT if cap is None else FP32_INSIDE  # the written-out scores' softmax runs in float32 by design
    torch.testing.assert_close(got, want, **tol)
    probe = randn(*got.shape, seed=9)
    grads = zip(("q", "k", "v", "sinks"), torch.autograd.grad((got * probe).sum(), xa),
                torch.autograd.grad((want * probe).sum(), xr))
    for name, a, b in grads:
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"gradient of {name}: {m}")
    # The sinks matter: without them the answer is another one.
    without = naive_sink_attention(*tensors[:3], None, see, cap=cap, bias=bias)
    assert (want.detach() - without).abs().max() > 1e-2


def test_sinks_flex_path_rescales_by_log_sum_exp():
    """FlexAttention with a block mask (a window, a softcap and ALiBi among its functions), rescaled by
    its log-sum-exp (eager here: its reference kernel; the stack builds such masks only where flex
    returns the log-sum-exp, see the next test)."""
    (q, k, v, sinks), pos, spec, (see, cap, bias) = make_case("everything", dtype=torch.float32)
    mask = BlockMasks().build(spec, B, T, T, "cpu", None)
    got = scaled_dot_product(q, k, v, pos._replace(block_masks=((spec, mask),)), spec, None, sinks)
    want = naive_sink_attention(*(t.double() for t in (q, k, v, sinks)), see, cap=cap,
                                bias=None if bias is None else bias.double())
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_no_block_mask_for_sinks_where_flex_cannot_rescale():
    """Inductor's CPU flex kernel returns no log-sum-exp (torch 2.13): on CPU a sink layer gets no block
    mask, so it takes the dense path; elsewhere it does, and the plain causal spec with sinks is not plain."""
    plain, sinks = MaskSpec(True), MaskSpec(True, sinks=True)
    assert flex_computes(plain, "cpu") and not flex_computes(sinks, "cpu") and flex_computes(sinks, "cuda")
    built = BlockMasks().for_forward([plain, sinks, MaskSpec(True, 4, sinks=True), MaskSpec(True, 4)],
                                     B, T, T, "cpu", None, None, None)
    assert [spec for spec, _ in built] == [MaskSpec(True, 4)]


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "rolling_window"])
def test_sinks_in_cached_decoding(window):
    """A prefill of 4 tokens, then one token per step, through a layer's buffer (a rolling one under
    a window) as the gqa layer drives it: the naive reference over the whole sequence."""
    (q, k, v, sinks), _, _, _ = make_case("window")
    pad = torch.zeros(B, dtype=torch.long)
    rolling = window is not None
    buffer = KVBuffer(B, window if rolling else T, pad, {"k": (KV, HEAD), "v": (KV, HEAD)}, rolling, dtype=F64)
    parts = []
    for start, stop in [(0, 4), *((i, i + 1) for i in range(4, T))]:
        steps = torch.arange(start, stop)
        keys, key_steps = buffer.write(steps, k=k[..., start:stop, :], v=v[..., start:stop, :])
        parts.append(attend_cached(q[..., start:stop, :], keys["k"], keys["v"], DecodeInputs(steps, pad), key_steps,
                                   pad, causal=True, window=window, sinks=sinks))
    want = naive_sink_attention(q, k, v, sinks, allowed(T, True, window))
    # a single query's step writes its scores out, their softmax in float32 by design
    torch.testing.assert_close(torch.cat(parts, dim=-2), want, **FP32_INSIDE)


def test_sink_logits_of_minus_infinity_are_no_sinks():
    """A check that the sink column is a column of the softmax and nothing else."""
    (q, k, v, _), pos, spec, (see, _, _) = make_case("window")
    gone = torch.full((H,), float("-inf"), dtype=F64)
    got = scaled_dot_product(q, k, v, pos, spec, None, gone)
    torch.testing.assert_close(got, naive_sink_attention(q, k, v, None, see), **TIGHT)


# --------------------------------------------------------- the layer against transformers


def gpt_oss_config(**changes):
    from transformers import GptOssConfig

    sizes = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=24,
                 num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=1, vocab_size=128,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=True)
    config = GptOssConfig(**{**sizes, **changes})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    return config


@pytest.mark.parametrize("window", [None, 3], ids=["causal", "window"])
def test_attention_matches_gpt_oss_attention(window):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention, GptOssRotaryEmbedding

    overrides = ["attention.sinks=true", "model.qkv_bias=true", "model.attention_bias=true"]
    ctx = make_ctx(*overrides, *([f"attention.window={window}"] if window else []))
    ours = randomize_(ctx.build("attention").double(), std=0.25)
    config = gpt_oss_config(layer_types=["sliding_attention" if window else "full_attention"],
                            sliding_window=window)
    theirs = GptOssAttention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for proj, w, b in zip((theirs.q_proj, theirs.k_proj, theirs.v_proj), ours.qkv.weight.split((64, 32, 32)),
                              ours.qkv.bias.split((64, 32, 32))):
            proj.weight.copy_(w), proj.bias.copy_(b)
        theirs.o_proj.weight.copy_(ours.out.weight), theirs.o_proj.bias.copy_(ours.out.bias)
        theirs.sinks.copy_(ours.sinks)
    assert ours.sinks.abs().min() > 0  # random sinks, not the zeros they start at
    x = randn(B, T, 64, seed=5)
    positions = torch.arange(T)
    cos_sin = GptOssRotaryEmbedding(config)(x, positions[None].expand(B, -1))
    mask = torch.zeros(T, T, dtype=F64).masked_fill(~allowed(T, True, window), float("-inf"))[None, None]
    xa, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = ours(xa, ctx.position.double().attention_inputs(positions))
    want = theirs(xt, tuple(t.double() for t in cos_sin), mask.expand(B, 1, T, T))[0]
    # Both take RoPE's angles in float32 (ours by design, theirs in GptOssRotaryEmbedding).
    torch.testing.assert_close(got, want, **FP32_INSIDE)
    probe = randn(*got.shape, seed=6)
    (got * probe).sum().backward()
    (want * probe).sum().backward()
    torch.testing.assert_close(xa.grad, xt.grad, **FP32_INSIDE)
    torch.testing.assert_close(ours.sinks.grad, theirs.sinks.grad, **FP32_INSIDE)


# ---------------------------------------------------------------- activation and experts


def interleaved(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gpt-oss's gate_up layout: gate at [..., ::2], up at [..., 1::2]."""
    return torch.stack((gate, up), dim=-1).flatten(-2)


def test_clamped_swiglu_matches_gpt_oss_gate():
    """Our defaults are gpt-oss's (alpha 1.702, limit 7.0); the MoE test below sets another limit."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    act = make_ctx("activation=swiglu_clamped").shared("activation")
    assert act.gated and (act.alpha, act.limit) == (1.702, 7.0)
    experts = GptOssExperts(gpt_oss_config())
    limit = experts.limit
    gate, up = randn(3, 40, seed=1, scale=3 * limit), randn(3, 40, seed=2, scale=3 * limit)
    assert (gate > limit).any() and (up.abs() > limit).any()  # both clamps take part
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    gt, ut = gate.clone().requires_grad_(), up.clone().requires_grad_()
    got, want = act.combine(ga, ua), experts._apply_gate(interleaved(gt, ut))
    torch.testing.assert_close(got, want, **TIGHT)
    probe = randn(*got.shape, seed=3)
    torch.testing.assert_close(torch.autograd.grad((got * probe).sum(), (ga, ua)),
                               torch.autograd.grad((want * probe).sum(), (gt, ut)), **TIGHT)


def test_clamped_swiglu_in_the_dense_ffn():
    """The dense FFN joins its halves through the same hook: down((clamp(up) + 1) * glu(gate))."""
    ffn = randomize_(make_ctx("activation=swiglu_clamped", "activation.limit=0.5", "ffn=dense").build("ffn").double())
    x = randn(2, 5, 64)
    gate, up = (x @ ffn.up.weight.T).chunk(2, dim=-1)
    g = gate.clamp(max=0.5)
    want = ((up.clamp(-0.5, 0.5) + 1) * g * torch.sigmoid(1.702 * g)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x).output, want, **TIGHT)


def gpt_oss_moe(limit: float = 7.0, extra=()):
    ctx = make_ctx("ffn=gpt_oss_moe", "activation=swiglu_clamped", f"activation.limit={limit}", "model.n_experts=4",
                   "model.experts_per_token=2", "model.ffn_dim=24", *extra)
    return randomize_(ctx.build("ffn", layer_idx=0).double(), std=0.3)


def copy_into_gpt_oss_mlp(moe, mlp) -> None:
    f = moe.w_out.shape[1]
    with torch.no_grad():
        mlp.router.weight.copy_(moe.router.weight), mlp.router.bias.copy_(moe.router.bias)
        mlp.experts.gate_up_proj.copy_(interleaved(moe.w_in[..., :f], moe.w_in[..., f:]))
        mlp.experts.gate_up_proj_bias.copy_(interleaved(moe.in_bias[..., :f], moe.in_bias[..., f:]))
        mlp.experts.down_proj.copy_(moe.w_out), mlp.experts.down_proj_bias.copy_(moe.out_bias)


def test_biased_moe_matches_gpt_oss_mlp():
    """Output and every gradient (input, router, experts' weights and biases) of ffn=gpt_oss_moe against
    GptOssMLP on the same weights (a small limit, so the clamps take part); our router computes in
    float32 by design."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    limit = 0.5
    moe = gpt_oss_moe(limit)
    assert moe.in_bias.shape == (4, 48) and moe.out_bias.shape == (4, 64) and moe.router.bias.shape == (4,)
    mlp = GptOssMLP(gpt_oss_config(swiglu_limit=limit)).double()
    copy_into_gpt_oss_mlp(moe, mlp)
    x = randn(2, 7, 64, seed=4)
    xa, xt = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = moe(xa).output, mlp(xt)[0]
    assert_close(got, want, ROUTER_FP32, "forward")
    probe = randn(*got.shape, seed=5)
    (got * probe).sum().backward()
    (want * probe).sum().backward()
    f = 24
    e = mlp.experts
    pairs = {"input": (xa.grad, xt.grad), "router.weight": (moe.router.weight.grad, mlp.router.weight.grad),
             "router.bias": (moe.router.bias.grad, mlp.router.bias.grad),
             "w_in (gate)": (moe.w_in.grad[..., :f], e.gate_up_proj.grad[..., ::2]),
             "w_in (up)": (moe.w_in.grad[..., f:], e.gate_up_proj.grad[..., 1::2]),
             "in_bias (gate)": (moe.in_bias.grad[..., :f], e.gate_up_proj_bias.grad[..., ::2]),
             "in_bias (up)": (moe.in_bias.grad[..., f:], e.gate_up_proj_bias.grad[..., 1::2]),
             "w_out": (moe.w_out.grad, e.down_proj.grad), "out_bias": (moe.out_bias.grad, e.down_proj_bias.grad)}
    for name, (a, b) in pairs.items():
        assert_close(a, b, ROUTER_FP32, f"gradient of {name}")
    assert moe.out_bias.grad.abs().max() > 0 and moe.router.bias.grad.abs().max() > 0


def test_softmax_over_top_k_logits_is_renormalized_top_k_of_softmax():
    """gpt-oss softmaxes its top-k router logits; ours renormalizes the top-k softmax probabilities:
    exp(l_i) / sum_top-k exp(l_j) either way, with the same experts chosen (softmax is monotone)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    logits = randn(50, 8, seed=6, scale=3.0)
    top = logits.topk(3, dim=-1)
    ours = expert_weights(torch.softmax(logits, dim=-1), top.indices, "softmax", True, 1.0)
    torch.testing.assert_close(ours, torch.softmax(top.values, dim=-1), **TIGHT)
    # and the modules: our router (float32 by design) against GptOssTopKRouter on the same weights
    moe = gpt_oss_moe()
    router = GptOssTopKRouter(gpt_oss_config()).double()
    with torch.no_grad():
        router.weight.copy_(moe.router.weight), router.bias.copy_(moe.router.bias)
        x = randn(30, 64, seed=7)
        _, weights, chosen = router(x)
        r = moe.route(x)
    assert torch.equal(r.chosen, chosen)
    torch.testing.assert_close(r.weights.double(), weights, rtol=1e-6, atol=1e-6)


def test_expert_biases_through_the_fused_bf16_kernel(monkeypatch):
    """bf16 takes torch._grouped_mm (the fp32 loop is what the HF comparison above runs); the
    biases are added outside it, so both kernels get them."""
    calls = []
    fused = torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or fused(*a, **k))
    moe = gpt_oss_moe(limit=0.5)
    x = randn(2, 7, 64, seed=4)
    want = moe(x).output
    got = moe.to(torch.bfloat16)(x.to(torch.bfloat16)).output
    assert calls == [torch.bfloat16, torch.bfloat16]
    assert_close(got.double(), want, dict(rtol=3e-2, atol=3e-2, atol_per_max=2e-2), "bf16 forward")
    with torch.no_grad():
        moe.out_bias.zero_()
    assert (moe(x.to(torch.bfloat16)).output.double() - got.double()).abs().max() > 0.1  # the biases count


# -------------------------------------------------------------------- card and config

GPT_OSS_PARTS = ["attention.sinks=true", "activation=swiglu_clamped", "ffn=gpt_oss_moe", "model.n_experts=4",
                 "model.experts_per_token=2", "model.expert_ffn_dim=24"]
TINY_MOE = ["model=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "ffn=moe", "activation=swiglu", "model.n_experts=4", "model.experts_per_token=2",
            "model.expert_ffn_dim=24"]


def test_card_counts_sinks_and_biases_exactly():
    """Per layer: 4 sinks; 4 experts x (2 x 24 + 64) biases, 2 of them active per token; 4 router biases."""
    base = architecture_card(lc.resolve_spec(lc.compose(TINY_MOE)))
    card = architecture_card(lc.resolve_spec(lc.compose([*TINY_MOE, *GPT_OSS_PARTS])))
    layers, heads, experts, k, per_expert = 2, 4, 4, 2, 2 * 24 + 64
    assert card["params_total"] - base["params_total"] == layers * (heads + experts * per_expert + experts)
    assert card["params_active"] - base["params_active"] == layers * (heads + k * per_expert + experts)
    assert card["attention"]["sinks"] is True
    assert card["flops_matmul"] == base["flops_matmul"]  # biases and sinks are no matrix products


def test_no_weight_decay_on_sinks_and_biases():
    """AdamW decays matrices only: the sinks and router bias are vectors, the stacked expert biases
    2-D but biases (by name)."""
    from llmarch_compose.train.loop import TrainSettings, optimizer_for

    model = lc.build(lc.compose([*TINY_MOE, *GPT_OSS_PARTS]), device="meta")
    decay, no_decay = ({id(p) for p in group["params"]} for group in optimizer_for(model, TrainSettings()).param_groups)
    named = dict(model.named_parameters())
    for name in ("attn.sinks", "ffn.router.bias", "ffn.in_bias", "ffn.out_bias"):
        assert id(named[f"decoder.blocks.0.{name}"]) in no_decay, name
    for name in ("ffn.w_in", "ffn.w_out", "ffn.router.weight", "attn.qkv.weight"):
        assert id(named[f"decoder.blocks.0.{name}"]) in decay, name


def test_a_bad_limit_names_its_key():
    with pytest.raises(ConfigError) as info:
        lc.resolve_spec(lc.compose(["model=tiny", "activation=swiglu_clamped", "activation.limit=0"]))
    assert info.value.key == "activation.limit" and "a number > 0" in str(info.value)


def test_types_that_do_not_declare_the_options_refuse_them_by_name(tmp_path):
    """Mixtral's type declares none of them: each is a failing field by its key, and to_hf refuses."""
    from llmarch_compose.interop.fit import problems
    from llmarch_compose.interop.hf import to_hf
    from llmarch_compose.interop.types import MODEL_TYPES

    cfg = lc.compose(["model=mixtral_8x7b", "scale=tiny", "attention.sinks=true", "activation=swiglu_clamped",
                      "ffn.expert_bias=true", "ffn.router_bias=true"])
    spec = lc.resolve_spec(cfg)
    keys = [key for key, *_ in problems(spec, MODEL_TYPES["mixtral"].expresses, "mixtral")]
    assert keys == ["activation", "attention.sinks", "ffn.expert_bias", "ffn.router_bias"]
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg, device="meta"), cfg, tmp_path / "out", model_type="mixtral")
    assert info.value.key == "activation"
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------- the whole model (slow)

#: A model with every part: sinks on every layer, a window on the first (gpt-oss alternates them),
#: the clamped SwiGLU (a small limit, so clamps take part) and the biased MoE.
WHOLE = [*GPT_OSS_PARTS, "activation.limit=1.0", "model.layer_pattern=[{every:2,offset:0,attention:{window:5}}]"]


@pytest.fixture(scope="module")
def whole():
    pm = build_with("attention", "gqa", WHOLE)
    randomize_(pm.model, std=0.3)
    return pm


@pytest.mark.slow
def test_whole_model_decodes_from_its_cache_like_the_full_forward(whole):
    assert any(getattr(m, "window", None) == 5 for m in whole.instances)
    ids = whole.input_ids(2, 16)  # past the window
    assert check_decoding(whole, ids, split=4) <= 1e-5


@pytest.mark.slow
def test_whole_model_compiles_fullgraph_like_eager(whole):
    """Regionally, as lc.compile does: the parts live in the blocks (whole-model graphs
    are checked for every preset in test_all_presets)."""
    check_compiled(whole, whole.input_ids(2, 12))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_whole_model_checkpoints_activations_with_the_same_gradients(whole, mode):
    ids = whole.input_ids(2, 12)
    checkpointed = copy.deepcopy(whole.model)
    recompute.apply(checkpointed, mode)
    grads = []
    for model in (whole.model, checkpointed):
        model.zero_grad(set_to_none=True)
        loss_of(model(ids), ids.roll(-1, 1)).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode}, {name}: {m}")
    whole.model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_sinks_in_cross_attention_decode_like_the_full_forward():
    """An encoder-decoder's layers (self- and cross-attention alike) take the sinks too, cached or not."""
    from test_generate import _check_cached_equals_full

    model = lc.build(lc.compose(["model=t5_small", "scale=tiny", "attention.sinks=true"])).eval()
    randomize_(model, std=0.1)  # matrices small enough for fp32 to hold 1e-5 over the layers; sinks ~N(0, 0.3)
    crossing = [m for m in model.modules() if getattr(m, "cross", False)]
    assert crossing and all(m.sinks is not None and m.sinks.abs().min() > 0 for m in crossing)
    _check_cached_equals_full(model, torch.Generator().manual_seed(0))
