"""The `moe` plugin's routing variants (conf/ffn/: switch_moe, deepseek_moe, qwen_moe):
against a naive per-token reference written here, against their transformers peers
(DeepseekV3MoE, Qwen2MoeSparseMoeBlock, SwitchTransformersSparseMLP), the balancing
bias update by hand, the capacity drops, the cost card, and whole tiny models
trained one step and compiled with fullgraph."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import llmarch_compose as lc
import reference as ref
from llmarch_compose import ConfigError
from llmarch_compose.model.card import count_params
from llmarch_compose.registry.ffn.moe import MixtureOfExperts, expert_capacity, kept_slots
from test_plugin_numerics import ACTIVATION_CASES, ROUTER_FP32, check_forward_backward, make_ctx, randn, randomize_

E, D, HIDDEN = 8, 64, 24  # experts, d_model (conftest's TINY), each expert's width
PEER = dict(rtol=1e-5, atol=1e-6)  # the peers route in float32 from a float32-rounded input (Switch)


# ---------------------------------------------------------------------- naive reference


def naive_route(xt, router_w, bias, c):
    """One token: (logits, scores, chosen experts, their weights), with Python loops."""
    logits = [(router_w[e] * xt).sum() for e in range(E)]
    if c["router"] == "softmax":
        m = max(float(v.detach()) for v in logits)
        exps = [torch.exp(v - m) for v in logits]
        scores = [v / sum(exps) for v in exps]
    else:
        scores = [1.0 / (1.0 + torch.exp(-v)) for v in logits]
    choice = [float(scores[e].detach()) + (0.0 if bias is None else float(bias[e])) for e in range(E)]
    size = E // c["groups"]
    group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(c["groups"])]
    best = sorted(range(c["groups"]), key=lambda g: (-group_score[g], g))[:c["topk_groups"]]
    eligible = [e for e in range(E) if e // size in best]
    chosen = sorted(eligible, key=lambda e: (-choice[e], e))[:c["k"]]
    weights = [scores[e] for e in chosen]
    if c["normalize"]:
        total = sum(weights)
        weights = [w / total for w in weights]
    return logits, scores, chosen, [w * c["scaling"] for w in weights]


def naive_kept(chosen_seq, capacity):
    """kept[t][j] for one sequence: first choices of all tokens in order, then second choices, ..."""
    kept = [[True] * len(c) for c in chosen_seq]
    if capacity is None:
        return kept
    load = [0] * E
    for j in range(len(chosen_seq[0])):
        for t, c in enumerate(chosen_seq):
            load[c[j]] += 1
            kept[t][j] = load[c[j]] <= capacity
    return kept


def naive_moe(x, p, c, bias=None):
    """x [batch, seq, d] -> (output, aux loss, chosen [tokens][k], kept [tokens][k])."""
    act, gated = ref.ACTIVATIONS[c["act"]]
    b, s, _ = x.shape
    routes = [naive_route(x[i, t], p["router.weight"], bias, c) for i in range(b) for t in range(s)]
    chosen = [r[2] for r in routes]
    capacity = c.get("capacity")
    if capacity is None and c.get("factor") is not None:
        capacity = math.ceil(c["factor"] * s * c["k"] / E)
    kept = [k for i in range(b) for k in naive_kept(chosen[i * s:(i + 1) * s], capacity)]
    outs = []
    for n, (_, _, experts, weights) in enumerate(routes):
        xt = x.reshape(-1, x.shape[-1])[n]
        y = torch.zeros_like(xt)
        for j, (e, w) in enumerate(zip(experts, weights)):
            if kept[n][j]:
                h = xt @ p["w_in"][e]
                h = act(h[:HIDDEN]) * h[HIDDEN:] if gated else act(h)
                y = y + w * (h @ p["w_out"][e])
            elif c.get("dropped") == "identity":
                y = y + w * xt
        if c.get("shared"):
            shared = ref.dense_ffn(xt, p["shared.up.weight"], None, p["shared.down.weight"], None,
                                   act, gated, c["shared"] * HIDDEN)
            if c.get("gate"):
                shared = shared / (1.0 + torch.exp(-(p["shared_gate.weight"][0] * xt).sum()))
            y = y + shared
        outs.append(y)
    scores = torch.stack([torch.stack(list(r[1])) for r in routes])
    probs = scores if c["router"] == "softmax" else scores / scores.sum(dim=-1, keepdim=True)
    aux = c["aux"] * ref.switch_balance_loss(probs, chosen, E)
    z = [torch.log(sum(torch.exp(v) for v in r[0])) ** 2 for r in routes]
    aux = aux + c.get("z", 0.0) * sum(z) / len(z)
    return torch.stack(outs).reshape(x.shape), aux, chosen, kept


# ------------------------------------------------------------------------------ cases

BASE = dict(router="softmax", groups=1, topk_groups=1, k=2, normalize=True, scaling=1.0, aux=0.05, act="swiglu")
CASES = {
    "softmax_grouped_biased": dict(groups=4, topk_groups=2, bias=True, rate=0.01),
    "sigmoid_grouped_scaled_shared": dict(router="sigmoid", groups=4, topk_groups=2, k=3, scaling=2.5, shared=1,
                                          bias=True),
    "sigmoid_raw_gelu_zloss": dict(router="sigmoid", normalize=False, act="gelu", z=0.01, bias=True),
    "qwen_shared_gated": dict(normalize=False, shared=2, gate=True),
    "switch_capacity_zero": dict(k=1, normalize=False, act="relu", capacity=1, dropped="zero", z=0.1),
    "switch_factor_identity": dict(k=1, normalize=False, act="relu", factor=0.75, dropped="identity"),
    "top2_capacity_identity": dict(k=2, factor=1.0, dropped="identity", act="geglu"),
}


def case_overrides(c) -> list[str]:
    o = ["ffn=moe", *ACTIVATION_CASES[c["act"]], f"model.n_experts={E}", f"model.experts_per_token={c['k']}",
         f"model.ffn_dim={HIDDEN}", f"ffn.router={c['router']}", f"model.n_expert_groups={c['groups']}",
         f"model.topk_expert_groups={c['topk_groups']}", f"ffn.normalize_top_k={str(c['normalize']).lower()}",
         f"model.routed_scaling_factor={c['scaling']}", f"model.router_aux_loss_coef={c['aux']}",
         f"model.router_z_loss_coef={c.get('z', 0.0)}", f"model.n_shared_experts={c.get('shared', 0)}",
         f"ffn.shared_gate={str(c.get('gate', False)).lower()}", f"ffn.dropped={c.get('dropped', 'zero')}",
         f"ffn.bias_update_rate={c.get('rate', 0.0)}"]
    if c.get("capacity") is not None:
        o.append(f"ffn.capacity={c['capacity']}")
    if c.get("factor") is not None:
        o.append(f"model.expert_capacity_factor={c['factor']}")
    return o


def build_case(name):
    c = {**BASE, **CASES[name]}
    moe = make_ctx(*case_overrides(c)).build("ffn", layer_idx=0)
    randomize_(moe.double(), std=0.3)
    if c.get("bias"):
        moe.score_bias.copy_(randn(E, seed=7) * 0.1)
    return c, moe


@pytest.mark.parametrize("name", list(CASES))
def test_variant_matches_naive_reference(name):
    c, moe = build_case(name)
    bias = moe.score_bias
    x = randn(2, 10, D)
    with torch.no_grad():
        _, _, chosen, kept = naive_moe(x, dict(moe.named_parameters()), c, bias)
        got = moe.route(x.reshape(-1, D)).chosen
    assert [sorted(t) for t in got.tolist()] == [sorted(t) for t in chosen]
    drops = sum(not k for t in kept for k in t)
    if "capacity" in c or "factor" in c:
        assert 0 < drops < len(kept) * c["k"], "the case should drop some slots, not all"
    else:
        assert drops == 0
    if c.get("bias"):  # the bias must matter for the test to test it
        with torch.no_grad():
            unbiased = naive_moe(x, dict(moe.named_parameters()), c, None)[2]
        assert unbiased != chosen

    def actual(x):
        out = moe(x)
        return torch.cat((out.output.flatten(), out.aux_loss.reshape(1).to(x.dtype)))

    def expected(x, p):
        y, aux, _, _ = naive_moe(x, p, c, bias)
        return torch.cat((y.flatten(), aux.reshape(1)))

    check_forward_backward(actual, expected, moe, [x], ROUTER_FP32)


def test_default_moe_unchanged():
    """ffn=moe keeps its state (no bias buffer, no shared experts) and its numbers."""
    moe = make_ctx("ffn=moe").build("ffn")
    assert set(moe.state_dict()) == {"router.weight", "w_in", "w_out"}
    assert (moe.router_kind, moe.n_groups, moe.topk_groups, moe.routed_scaling) == ("softmax", 1, 1, 1.0)
    assert moe.shared is None and moe.slot_capacity(1000) is None and moe.z_loss_coef == 0.0


# -------------------------------------------------------------------------- peers


def fill_(tensor, std, seed):
    with torch.no_grad():
        tensor.copy_(randn(*tensor.shape, seed=seed) * std)


def copy_experts(moe, gate_up, down):
    """transformers' [experts, 2I, d] (gate rows first) and [experts, d, I] into ours."""
    with torch.no_grad():
        moe.w_in.copy_(gate_up.transpose(1, 2))
        moe.w_out.copy_(down.transpose(1, 2))


def copy_shared(moe, mlp):
    with torch.no_grad():
        moe.shared.up.weight.copy_(torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)))
        moe.shared.down.weight.copy_(mlp.down_proj.weight)


def eager_peer(config):
    config._experts_implementation = "eager"
    config._attn_implementation = "eager"
    return config


def test_deepseek_v3_moe():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = eager_peer(DeepseekV3Config(
        hidden_size=D, moe_intermediate_size=16, n_routed_experts=E, num_experts_per_tok=2, n_group=4,
        topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5, norm_topk_prob=True, hidden_act="silu"))
    hf = DeepseekV3MoE(config).double().eval()
    for i, t in enumerate((hf.experts.gate_up_proj, hf.experts.down_proj, hf.shared_experts.gate_proj.weight,
                           hf.shared_experts.up_proj.weight, hf.shared_experts.down_proj.weight)):
        fill_(t, 0.2, seed=10 + i)
    fill_(hf.gate.weight, 1.5 / math.sqrt(D), seed=20)
    fill_(hf.gate.e_score_correction_bias, 0.1, seed=21)

    moe = make_ctx("ffn=deepseek_moe", "activation=swiglu", f"model.n_experts={E}", "model.experts_per_token=2",
                   "model.expert_ffn_dim=16", "model.n_expert_groups=4", "model.topk_expert_groups=2",
                   "model.n_shared_experts=2", "model.routed_scaling_factor=2.5").build("ffn").double().eval()
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
        moe.score_bias.copy_(hf.gate.e_score_correction_bias)
    copy_experts(moe, hf.experts.gate_up_proj, hf.experts.down_proj)
    copy_shared(moe, hf.shared_experts)

    x = randn(2, 7, D, seed=3)
    with torch.no_grad():
        _, hf_weights, hf_chosen = hf.gate(x)
        r = moe.route(x.reshape(-1, D))
        order = r.chosen.argsort(dim=-1)
        hf_order = hf_chosen.argsort(dim=-1)
        assert torch.equal(r.chosen.gather(1, order), hf_chosen.gather(1, hf_order))
        torch.testing.assert_close(r.weights.gather(1, order).double(), hf_weights.gather(1, hf_order).double(),
                                   **PEER)
        torch.testing.assert_close(moe(x).output, hf(x), **PEER)
    # Group-limited: the chosen experts lie in at most topk_group groups, and the limit binds.
    assert max(len(set((r.chosen // 2)[t].tolist())) for t in range(14)) <= 2
    ungrouped = r.scores.add(moe.score_bias).topk(2).indices
    assert not torch.equal(ungrouped.sort().values, r.chosen.sort().values)


def test_qwen2_moe_block():
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    config = eager_peer(Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                       num_experts=E, num_experts_per_tok=2, norm_topk_prob=False, hidden_act="silu"))
    hf = Qwen2MoeSparseMoeBlock(config).double().eval()
    for i, t in enumerate((hf.experts.gate_up_proj, hf.experts.down_proj, hf.shared_expert.gate_proj.weight,
                           hf.shared_expert.up_proj.weight, hf.shared_expert.down_proj.weight,
                           hf.shared_expert_gate.weight)):
        fill_(t, 0.2, seed=30 + i)
    fill_(hf.gate.weight, 1.5 / math.sqrt(D), seed=40)

    moe = make_ctx("ffn=qwen_moe", "activation=swiglu", f"model.n_experts={E}", "model.experts_per_token=2",
                   "model.expert_ffn_dim=16", "model.n_shared_experts=2").build("ffn").double().eval()
    assert not moe.normalize_top_k and moe.shared_gate is not None
    with torch.no_grad():
        moe.router.weight.copy_(hf.gate.weight)
        moe.shared_gate.weight.copy_(hf.shared_expert_gate.weight)
    copy_experts(moe, hf.experts.gate_up_proj, hf.experts.down_proj)
    copy_shared(moe, hf.shared_expert)
    x = randn(2, 7, D, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(moe(x).output, hf(x), **PEER)


def switch_pair(capacity: int, dropped: str):
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersSparseMLP

    config = eager_peer(SwitchTransformersConfig(d_model=D, d_ff=HIDDEN, num_experts=E, expert_capacity=capacity,
                                                 dense_act_fn="relu", router_bias=False, router_jitter_noise=0.0))
    hf = SwitchTransformersSparseMLP(config).double().eval()
    moe = make_ctx("ffn=switch_moe", "activation=relu", f"model.n_experts={E}", f"model.ffn_dim={HIDDEN}",
                   f"ffn.capacity={capacity}", f"ffn.dropped={dropped}").build("ffn").double().eval()
    fill_(moe.router.weight, 1.5 / math.sqrt(D), seed=50)
    fill_(moe.w_in, 0.2, seed=51)
    fill_(moe.w_out, 0.2, seed=52)
    with torch.no_grad():
        hf.router.classifier.weight.copy_(moe.router.weight)
        for e in range(E):
            hf.experts[f"expert_{e}"].wi.weight.copy_(moe.w_in[e].T)
            hf.experts[f"expert_{e}"].wo.weight.copy_(moe.w_out[e].T)
    return hf, moe


@pytest.mark.parametrize("dropped", ["zero", "identity"])
def test_switch_sparse_mlp(dropped):
    """transformers 5.x gives a dropped token a zero output (4.x gave router_prob * input,
    which dropped=identity reproduces)."""
    capacity = 2
    hf, moe = switch_pair(capacity, dropped)
    assert (moe.top_k, moe.normalize_top_k) == (1, False)
    x = randn(3, 10, D, seed=5)
    with torch.no_grad():
        dispatch, prob, hf_logits = hf.router(x)  # capacity-masked one-hot [b, s, E], chosen prob [b, s, 1]
        want = hf(x)
        hf_dropped = dispatch.sum(-1) == 0  # [b, s]
        if dropped == "identity":
            want = want + hf_dropped[..., None] * prob * x
        got = moe(x).output
        chosen = moe.route(x.reshape(-1, D)).chosen.view(3, 10)
    assert torch.equal(chosen, hf_logits.argmax(-1))
    assert 0 < hf_dropped.sum() < 30
    torch.testing.assert_close(got, want, **PEER)
    if dropped == "zero":
        assert torch.equal(got[hf_dropped], torch.zeros_like(got[hf_dropped]))


def test_capacity_drop_count():
    """Per sequence, an expert chosen n times keeps its first min(n, capacity) slots, in
    token order; the layer's output for a token with no kept slot is exactly zero."""
    capacity = 3
    moe = make_ctx("ffn=switch_moe", "activation=relu", f"model.n_experts={E}",
                   f"ffn.capacity={capacity}").build("ffn").double()
    fill_(moe.router.weight, 1.0 / math.sqrt(D), seed=70)
    x = randn(4, 16, D, seed=8)
    with torch.no_grad():
        chosen = moe.route(x.reshape(-1, D)).chosen
        keep = kept_slots(chosen, E, 16, capacity).view(4, 16)
        out = moe(x).output
    per_seq = chosen.view(4, 16)
    want_drops = sum(max(0, (per_seq[b] == e).sum().item() - capacity) for b in range(4) for e in range(E))
    assert (~keep).sum().item() == want_drops > 0
    for b in range(4):
        for t in range(16):
            earlier = (per_seq[b, :t] == per_seq[b, t]).sum().item()
            assert keep[b, t].item() == (earlier < capacity)
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    assert (out[keep].abs().sum(-1) > 0).all()
    # capacity_factor: ceil(factor * seq * top_k / experts) slots per expert.
    assert expert_capacity(None, 1.25, 16, 1, E) == 3 and expert_capacity(None, 1.0, 16, 2, E) == 4
    assert expert_capacity(5, None, 16, 1, E) == 5 and expert_capacity(None, None, 16, 1, E) is None


def test_z_loss_matches_transformers():
    from transformers.models.switch_transformers.modeling_switch_transformers import router_z_loss_func

    moe = make_ctx("ffn=switch_moe", f"model.n_experts={E}", "model.router_aux_loss_coef=0",
                   "model.router_z_loss_coef=0.1").build("ffn").double()
    fill_(moe.router.weight, 1.0, seed=60)  # large logits: the z-loss is far from zero
    x = randn(3, 5, D, seed=6)
    with torch.no_grad():
        aux = moe(x).aux_loss
        logits = moe.router(x).float()
    want = 0.1 * router_z_loss_func(logits)
    naive = 0.1 * sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.view(-1, E).tolist()) / 15
    assert aux.item() == pytest.approx(want.item(), rel=1e-6)
    assert aux.item() == pytest.approx(naive, rel=1e-6)
    assert aux.item() > 1.0


# -------------------------------------------------------------- balancing without a loss


def test_bias_update_by_hand():
    moe = make_ctx("ffn=deepseek_moe", f"model.n_experts={E}", "model.n_expert_groups=4",
                   "model.topk_expert_groups=2", "ffn.bias_update_rate=0.01").build("ffn")
    assert moe.bias_update_rate == 0.01 and "expert_load" not in moe.state_dict()  # counts are not state
    fill_(moe.router.weight, 1.0 / math.sqrt(D), seed=80)
    x = randn(2, 9, D, seed=9, dtype=torch.float32)
    with torch.no_grad():
        moe.eval()
        moe(x)
        assert moe.expert_load.sum() == 0  # only training forwards count
        moe.train()
        moe(x)
        moe(x[:1])
        chosen = torch.cat((moe.route(x.reshape(-1, D)).chosen, moe.route(x[0]).chosen)).tolist()
    load = [sum(row.count(e) for row in chosen) for e in range(E)]
    assert moe.expert_load.tolist() == load and sum(load) == 27 * 2
    mean = sum(load) / E
    moe.after_optimizer_step()
    want = [0.01 * ((mean > n) - (mean < n)) for n in load]
    assert moe.score_bias.tolist() == pytest.approx(want, abs=1e-9)
    assert moe.expert_load.sum() == 0
    moe.after_optimizer_step()  # nothing counted: no change
    assert moe.score_bias.tolist() == pytest.approx(want, abs=1e-9)


def test_bias_updates_balance_the_load():
    """Repeated updates on the same tokens even out a skewed router (no gradient involved)."""
    moe = make_ctx("ffn=deepseek_moe", f"model.n_experts={E}", "ffn.bias_update_rate=0.02").build("ffn").train()
    fill_(moe.router.weight, 1.0 / math.sqrt(D), seed=81)
    with torch.no_grad():
        moe.router.weight[0] += 0.3  # a router that prefers the same experts for most tokens
    x = randn(64, D, seed=10, dtype=torch.float32) + 1.0

    def spread():
        moe.expert_load.zero_()
        with torch.no_grad():
            moe(x)
        return (moe.expert_load.max() - moe.expert_load.min()).item()

    before = spread()
    for _ in range(25):
        with torch.no_grad():
            moe(x)
        moe.after_optimizer_step()
    assert spread() < before / 2


def test_bias_stays_float32_when_cast():
    moe = make_ctx("ffn=deepseek_moe").build("ffn").to(torch.bfloat16)
    assert moe.w_in.dtype == torch.bfloat16 and moe.score_bias.dtype == torch.float32
    out = moe(randn(2, 3, D, dtype=torch.bfloat16))
    assert out.output.dtype == torch.bfloat16


# ------------------------------------------------------------------------------- card


def moe_layers(model) -> list[MixtureOfExperts]:
    return [m for m in model.modules() if isinstance(m, MixtureOfExperts)]


@pytest.mark.parametrize("variant", ["deepseek_moe", "qwen_moe"])
def test_active_params_count_shared_experts(tiny_cfg, variant):
    k, f, shared = 2, 32, 2
    cfg = tiny_cfg(f"ffn={variant}", f"model.n_experts={E}", f"model.experts_per_token={k}",
                   f"model.expert_ffn_dim={f}", f"model.n_shared_experts={shared}")
    model = lc.build(cfg, device="meta")
    counts = count_params(model)
    per_expert = D * 2 * f + f * D  # swiglu: w_in is d x 2f
    shared_params = D * 2 * shared * f + shared * f * D + (D if variant == "qwen_moe" else 0)
    layers = 2
    assert counts["params_active"] == counts["params_total"] - layers * (E - k) * per_expert
    moe = moe_layers(model)[0]
    assert sum(p.numel() for p in moe.parameters()) == E * D + E * per_expert + shared_params
    assert moe.active_params() == E * D + k * per_expert + shared_params


# ------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, key, valid", [
    (["model.n_expert_groups=3"], "model.n_expert_groups", [1, 2, 4, 8]),
    (["model.n_expert_groups=4", "model.topk_expert_groups=5"], "model.topk_expert_groups", [1, 2, 3, 4]),
    (["model.n_expert_groups=4", "model.topk_expert_groups=1", "model.experts_per_token=3"],
     "model.experts_per_token", [1, 2]),
    (["model.expert_capacity_factor=0"], "model.expert_capacity_factor", None),
    (["ffn.capacity=0"], "ffn.capacity", None),
    (["ffn.capacity=4", "model.expert_capacity_factor=1.0"], "ffn.capacity", None),
    (["ffn.router=tanh"], "ffn.router", ("softmax", "sigmoid")),
    (["ffn.dropped=drop"], "ffn.dropped", ("zero", "identity")),
    (["ffn.shared_gate=true"], "ffn.shared_gate", None),
    (["model.router_z_loss_coef=-1"], "model.router_z_loss_coef", None),
    (["model.routed_scaling_factor=0"], "model.routed_scaling_factor", None),
])
def test_validation(tiny_cfg, overrides, key, valid):
    with pytest.raises(ConfigError) as info:
        lc.resolve_spec(tiny_cfg("ffn=moe", f"model.n_experts={E}", *overrides))
    assert info.value.key == key
    if valid is not None:
        assert list(info.value.valid) == list(valid)


def test_yaml_variants_compose(tiny_cfg):
    spec = lc.resolve_spec(tiny_cfg("ffn=switch_moe", "model.expert_capacity_factor=1.25"))
    p = spec.params["ffn"]
    assert (p.plugin, p.name, p.top_k, p.normalize_top_k, p.capacity_factor, p.dropped) == \
        ("moe", "switch_moe", 1, False, 1.25, "zero")
    p = lc.resolve_spec(tiny_cfg("ffn=deepseek_moe", "model.n_shared_experts=1", "model.n_expert_groups=4",
                                 "model.topk_expert_groups=2", "model.routed_scaling_factor=2.5")).params["ffn"]
    assert (p.name, p.router, p.normalize_top_k, p.shared_experts, p.n_groups, p.topk_groups, p.routed_scaling) == \
        ("deepseek_moe", "sigmoid", True, 1, 4, 2, 2.5)
    p = lc.resolve_spec(tiny_cfg("ffn=qwen_moe", "model.n_shared_experts=1")).params["ffn"]
    assert (p.name, p.router, p.normalize_top_k, p.shared_gate, p.shared_experts) == \
        ("qwen_moe", "softmax", False, True, 1)


# ------------------------------------------------------------------ whole tiny models

MODELS = {
    "switch_moe": ["ffn=switch_moe", "model.expert_capacity_factor=1.0", "model.router_z_loss_coef=0.001"],
    "deepseek_moe": ["ffn=deepseek_moe", "model.n_expert_groups=4", "model.topk_expert_groups=2",
                     "model.n_shared_experts=1", "model.routed_scaling_factor=2.5", "ffn.bias_update_rate=0.01"],
    "qwen_moe": ["ffn=qwen_moe", "model.n_shared_experts=2", "model.expert_ffn_dim=32"],
}


def train_step(model, ids, targets):
    out = model(ids)
    loss = F.cross_entropy(out.logits.flatten(0, 1), targets.flatten()) + out.aux_loss
    loss.backward()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(MODELS))
def test_tiny_model_trains_and_compiles(tiny_cfg, variant):
    from torch._dynamo.utils import counters

    cfg = tiny_cfg(*MODELS[variant], f"model.n_experts={E}", "model.n_layers=1")
    torch.manual_seed(0)
    model = lc.build(cfg).train()
    eager = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    ids, targets = torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g)

    counters.clear()
    compiled = torch.compile(model, fullgraph=True)
    out_c, out_e = train_step(compiled, ids, targets), train_step(eager, ids, targets)
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_c.aux_loss, out_e.aux_loss, atol=1e-6, rtol=1e-5)
    named = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, named[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    assert not counters["graph_break"]
    # One optimizer step, then the hook the training loop calls on every module that has it.
    for m in (model, eager):
        torch.optim.SGD(m.parameters(), lr=0.1).step()
        for module in m.modules():
            if hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()
    (moe,), (moe_e,) = moe_layers(model), moe_layers(eager)
    if moe.expert_load is not None:
        assert torch.equal(moe.score_bias, moe_e.score_bias) and moe.score_bias.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
