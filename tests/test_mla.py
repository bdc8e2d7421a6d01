"""Multi-head latent attention (attention=mla) and QK-norm for attention=gqa.

MLA is compared with transformers' DeepseekV3Attention (weights copied by name, rope
interleaved or not, YaRN with DeepSeek's softmax mscale) and with a naive per-head
reference for what transformers does not cover (bidirectional stacks, sliding windows,
no rotary position, ALiBi biases, GLM's 2D rope, LayerNorm latents, an explicit scale). Forward outputs and the
gradients of inputs and every parameter are compared in float64; where RMSNorm (float32
inside by design) or transformers' float32 rope tables take part, the tolerance says so.
Its cost hooks are checked against the formulas on the card, and a tiny MLA model
trains and compiles to one graph. QK-norm (gqa) is checked against a naive reference
and transformers' Qwen3Attention.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters
from torch.func import functional_call

import llmarch_compose as lc
import reference as ref
from conftest import TINY
from llmarch_compose import ConfigError
from llmarch_compose.config.compose import presets
from llmarch_compose.model.card import architecture_card
from test_plugin_numerics import FP32_INSIDE, TIGHT, check_forward_backward, make_ctx, randn, randomize_

F64 = torch.float64
# RMSNorm computes in float32 by design (and transformers' DeepSeek norm, rope tables and
# eager softmax too).
# MLA's latent norms feed the wide up-projections, so that rounding reaches the weight
# gradients as absolute errors of ~3e-7 of the largest entry (2e-5 of 70): the absolute
# tolerance is scaled to each tensor's largest entry. With LayerNorm (float64 throughout)
# the same comparison holds to 1e-10.
RMSNORM_INSIDE = dict(rtol=1e-5, atol=1e-5, atol_per_max=1e-6)
HF_TOL = RMSNORM_INSIDE
PRESETS = presets()

# Small MLA numbers (TINY: d_model 64, 4 heads): every width differs from the others,
# and v_head_dim differs from qk_nope_head_dim.
DIMS = dict(kv_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
MLA = ["attention=mla", *(f"model.{k}={v}" for k, v in DIMS.items()), "model.norm_eps=1e-6"]


def mla_ctx(*overrides: str) -> lc.BuildContext:
    return make_ctx(*MLA, *overrides)


# ------------------------------------------------------------------ transformers


HF_CASES = {
    # id: (our overrides, q_lora_rank, rope_interleave, transformers rope_parameters, attention_bias)
    "direct": ([], None, True, {}, False),
    "q_lora": (["model.q_lora_rank=24"], 24, True, {}, False),
    "direct_halves": ([], None, False, {}, False),
    "q_lora_halves": (["model.q_lora_rank=24"], 24, False, {}, False),
    # DeepSeek-V3's YaRN: mscale = mscale_all_dim = 1, so cos and sin are not scaled (attention
    # factor 1) and the softmax scale is multiplied by (0.1 ln(factor) + 1)^2.
    "yarn_deepseek": (["model.q_lora_rank=24",
                       "model.rope_scaling={type:yarn,factor:4,original_max_seq_len:256,mscale:1.0,mscale_all_dim:1.0}"],
                      24, True, dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256,
                                     mscale=1.0, mscale_all_dim=1.0), False),
    # Plain YaRN: cos and sin scaled by 0.1 ln(factor) + 1, the softmax scale left alone.
    "yarn_plain": (["model.rope_scaling={type:yarn,factor:8,original_max_seq_len:256}"],
                   None, True, dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=256), False),
    "bias": (["model.q_lora_rank=24", "model.attention_bias=true"], 24, True, {}, True),
    "bias_direct": (["model.attention_bias=true"], None, True, {}, True),
}


def hf_mla(q_lora_rank, interleave, rope_parameters, bias):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": 10000.0, **rope_parameters}
    config = DeepseekV3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank,
                              **DIMS, max_position_embeddings=256 * int(rope.get("factor", 1)), rope_parameters=rope,
                              rope_interleave=interleave, attention_bias=bias, vocab_size=128, num_hidden_layers=1)
    config._attn_implementation = "eager"
    return DeepseekV3Attention(config, layer_idx=0).double(), DeepseekV3RotaryEmbedding(config)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_mla_matches_transformers(case):
    overrides, q_lora, interleave, rope_parameters, bias = HF_CASES[case]
    layout = f"model.rope_interleaved={str(interleave).lower()}"  # transformers' rope_interleave
    attn = randomize_(mla_ctx(*overrides, layout).build("attention").double(), std=0.25)
    hf, rotary = hf_mla(q_lora, interleave, rope_parameters, bias)
    # Same module names and shapes: the weights load strictly, both ways round.
    hf.load_state_dict(attn.state_dict(), strict=True)
    assert sum(p.numel() for p in attn.parameters()) == sum(p.numel() for p in hf.parameters())
    assert attn.scale == pytest.approx(hf.scaling, rel=1e-12)
    if case == "yarn_deepseek":
        assert attn.scale == pytest.approx((24 ** -0.5) * (0.1 * math.log(4) + 1) ** 2, rel=1e-12)
    b, t = 2, 9
    positions = torch.arange(t)
    mask = torch.full((t, t), float("-inf"), dtype=F64).triu(1)[None, None]
    pos = lc.PositionInputs()  # MLA builds its own rope tables; the shared ones are not read

    def expected(x, p):
        cos, sin = rotary(x, positions[None].expand(b, t))
        return functional_call(hf, p, (x, (cos, sin), mask))[0]

    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(b, t, 64)], HF_TOL)


def test_mla_interleave_and_yarn_change_the_answer():
    """The interleaved and half layouts and YaRN's mscale must change the output, or the
    comparisons above could pass with the options ignored."""
    x, pos = randn(1, 9, 64), lc.PositionInputs()
    outs = {}
    for name in ("direct", "direct_halves", "yarn_plain"):
        overrides, _, interleave, _, _ = HF_CASES[name]
        attn = mla_ctx(*overrides, f"model.rope_interleaved={str(interleave).lower()}").build("attention")
        randomize_(attn.double(), std=0.25)
        outs[name] = attn(x, pos)
    assert (outs["direct"] - outs["direct_halves"]).abs().max() > 1e-3
    assert (outs["direct"] - outs["yarn_plain"]).abs().max() > 1e-3
    plain = mla_ctx("model.rope_scaling={type:yarn,factor:4,original_max_seq_len:256}").build("attention")
    corrected = mla_ctx("model.rope_scaling={type:yarn,factor:4,original_max_seq_len:256,mscale:1.0,"
                        "mscale_all_dim:1.0}").build("attention")
    assert corrected.scale / plain.scale == pytest.approx((0.1 * math.log(4) + 1) ** 2)
    assert mla_ctx().build("attention").scale == pytest.approx(24 ** -0.5)


# ------------------------------------------------------------------ naive reference


def naive_mla(x, p, *, n_heads: int, q_lora: Optional[int], kv_lora: int, rope: int, nope: int, v_dim: int,
              causal: bool, norm, rotate=None, scale: Optional[float] = None,
              score_bias: Optional[torch.Tensor] = None, window: Optional[int] = None) -> torch.Tensor:
    """DeepSeek-V2's equations, one batch element and one head at a time:
    q = W_qb norm(W_qa x) (or W_q x); [c, k_r] = W_kva x; [k_n, v] = W_kvb norm(c) per head;
    scores = (q_n . k_n + rot(q_r) . rot(k_r)) * scale, k_r shared by all heads.
    `norm(t, name)` normalizes with the weights of the norm called `name`."""
    b, t, _ = x.shape
    scale = 1.0 / math.sqrt(nope + rope) if scale is None else scale
    allowed = ref.attention_allowed(t, causal, window)
    outputs = []
    for bi in range(b):
        xb = x[bi]
        if q_lora is None:
            q_all = ref.linear(xb, p["q_proj.weight"])
        else:
            c_q = norm(ref.linear(xb, p["q_a_proj.weight"], p.get("q_a_proj.bias")), "q_a_layernorm")
            q_all = ref.linear(c_q, p["q_b_proj.weight"])
        ckv = ref.linear(xb, p["kv_a_proj_with_mqa.weight"], p.get("kv_a_proj_with_mqa.bias"))
        c_kv, k_rope = ckv[:, :kv_lora], ckv[:, kv_lora:]
        if rotate is not None:
            k_rope = rotate(k_rope)
        kv_all = ref.linear(norm(c_kv, "kv_a_layernorm"), p["kv_b_proj.weight"])
        heads = []
        for h in range(n_heads):
            qh = q_all[:, h * (nope + rope):(h + 1) * (nope + rope)]
            q_nope, q_rope = qh[:, :nope], qh[:, nope:]
            if rotate is not None:
                q_rope = rotate(q_rope)
            kvh = kv_all[:, h * (nope + v_dim):(h + 1) * (nope + v_dim)]
            k_nope, v = kvh[:, :nope], kvh[:, nope:]
            scores = (q_nope @ k_nope.transpose(0, 1) + q_rope @ k_rope.transpose(0, 1)) * scale
            if score_bias is not None:
                scores = scores + score_bias[h]
            heads.append(ref.softmax_rows(scores, allowed) @ v)
        outputs.append(ref.linear(torch.cat(heads, dim=-1), p["o_proj.weight"], p.get("o_proj.bias")))
    return torch.stack(outputs)


NAIVE_CASES = {
    # id: (overrides, causal)
    "causal": ([], True),
    "window": (["attention.window=3"], True),
    "bidirectional_window": (["attention.window=2"], False),
    "bidirectional": ([], False),
    "interleaved_q_lora": (["position.interleaved=true", "model.q_lora_rank=24"], True),
    "layernorm_q_lora_bias": (["norm=layernorm", "model.q_lora_rank=20", "model.attention_bias=true"], True),
    "scale": (["attention.scale=0.3"], True),
    "no_position": (["position=none"], True),
    "alibi": (["position=alibi"], True),
    "alibi_bidirectional": (["position=alibi"], False),
    "derived_dims": (["model.kv_lora_rank=null", "model.qk_rope_head_dim=null", "model.qk_nope_head_dim=null",
                      "model.v_head_dim=null"], True),
}


@pytest.mark.parametrize("case", list(NAIVE_CASES))
def test_mla_matches_naive_reference(case):
    overrides, causal = NAIVE_CASES[case]
    ctx = mla_ctx(*overrides)
    attn = randomize_(ctx.build("attention", causal=causal).double(), std=0.25)
    pe = ctx.position.double()
    if case == "derived_dims":  # head_dim 16: kv_lora_rank 4 h, rope h / 2, nope h, v h
        assert (attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim, attn.v_head_dim) == (64, 8, 16, 16)
    t = 9
    positions = torch.arange(t)
    pos = pe.attention_inputs(positions)
    rope = attn.qk_rope_head_dim
    rotate = None
    if pos.rotary is not None:
        assert pe.rotary_dim == 16 != rope  # the shared tables have another width than MLA's rotary part

        # The private table holds theta^(-2i/rope) (in float32, as every rope table is stored).
        inv_freq = attn.rotary.inv_freq
        torch.testing.assert_close(inv_freq, ref.rope_inv_freq(10000.0, rope), rtol=1e-7, atol=0)

        def rotate(z):
            return ref.rope_rotate(z, positions, inv_freq, rope, pe.interleaved)
    else:
        assert attn.rotary is None
    layernorm = "layernorm" in case

    def expected(x, p):
        def norm(z, name):
            if layernorm:
                return ref.layernorm(z, p[f"{name}.weight"], p[f"{name}.bias"], 1e-6)
            return ref.rmsnorm(z, p[f"{name}.weight"], 1e-6)

        return naive_mla(x, p, n_heads=4, q_lora=attn.q_lora_rank, kv_lora=attn.kv_lora_rank, rope=rope,
                         nope=attn.qk_nope_head_dim, v_dim=attn.v_head_dim, causal=causal, norm=norm, rotate=rotate,
                         scale=0.3 if case == "scale" else None, score_bias=pos.bias, window=attn.window)

    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(2, t, 64)],
                           TIGHT if layernorm else RMSNORM_INSIDE)


def test_mla_prefix_lm_mask():
    """topology=prefix_decoder: the prefix mask reaches MLA's attention through the shared helper.
    With one layer, only the prefix's queries before its last token see more keys than causally."""
    cfg = lc.compose([*TINY, *MLA, "topology=prefix_decoder", "model.n_layers=1"])
    model = randomize_(lc.build(cfg).double(), std=0.2)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        causal = model(ids).logits
        prefixed = model(ids, prefix_len=4).logits
    assert (causal[:, :3] - prefixed[:, :3]).abs().amax(dim=-1).min() > 1e-6
    torch.testing.assert_close(causal[:, 3:], prefixed[:, 3:], **TIGHT)


# ------------------------------------------------------------------ parameters and costs


def norm_params(dim: int, layernorm: bool) -> int:
    return 2 * dim if layernorm else dim


PARAM_CASES = {
    # id: (overrides, q_lora, kv_lora, rope, nope, v, bias, layernorm)
    "explicit": ([], None, 32, 8, 16, 12, False, False),
    "q_lora_bias_layernorm": (["model.q_lora_rank=24", "model.attention_bias=true", "norm=layernorm"],
                              24, 32, 8, 16, 12, True, True),
    "derived": (["model.kv_lora_rank=null", "model.qk_rope_head_dim=null", "model.qk_nope_head_dim=null",
                 "model.v_head_dim=null"], None, 64, 8, 16, 16, False, False),
}


@pytest.mark.parametrize("case", list(PARAM_CASES))
def test_mla_parameter_count(case):
    overrides, q_lora, kv_lora, rope, nope, v, bias, layernorm = PARAM_CASES[case]
    attn = mla_ctx(*overrides).build("attention")
    d, h = 64, 4
    if q_lora is None:
        q = d * h * (nope + rope)
    else:
        q = d * q_lora + (q_lora if bias else 0) + norm_params(q_lora, layernorm) + q_lora * h * (nope + rope)
    kv = d * (kv_lora + rope) + (kv_lora + rope if bias else 0) + norm_params(kv_lora, layernorm)
    kv += kv_lora * h * (nope + v)
    out = h * v * d + (d if bias else 0)
    assert sum(p.numel() for p in attn.parameters()) == q + kv + out
    assert not list(attn.rotary.parameters())  # the private rope tables are buffers, not parameters
    assert set(attn.state_dict()) == {n for n, _ in attn.named_parameters()}  # nor saved


def test_card_kv_cache_and_attention_flops(tiny_cfg):
    cfg = tiny_cfg(*MLA, "model.q_lora_rank=24")
    spec = lc.resolve_spec(cfg)
    card = architecture_card(spec, dtype="bfloat16", context=64)
    layers = 2
    per_token = layers * (DIMS["kv_lora_rank"] + DIMS["qk_rope_head_dim"]) * 2  # the latent and the rope key
    assert card["kv_cache_bytes_per_token"] == per_token == 160
    assert card["kv_cache_bytes_full_context"] == per_token * 64
    qk, v = DIMS["qk_nope_head_dim"] + DIMS["qk_rope_head_dim"], DIMS["v_head_dim"]
    assert card["flops_attention"] == layers * 2 * 4 * (qk + v) * (64 + 1) / 2
    assert card["params_total"] == sum(p.numel() for p in lc.build(cfg).parameters())
    assert card["plugins"]["attention"] == "mla"
    # The GQA cache of the same model holds 2 * n_kv_heads * head_dim per token and layer.
    gqa = architecture_card(lc.resolve_spec(tiny_cfg()), dtype="bfloat16", context=64)
    assert gqa["kv_cache_bytes_per_token"] == layers * 2 * 2 * 16 * 2
    # A bidirectional stack caches nothing.
    enc = architecture_card(lc.resolve_spec(tiny_cfg(*MLA, "topology=encoder_only")), dtype="bfloat16")
    assert enc["kv_cache_bytes_per_token"] == 0
    # A sliding window caps the cached tokens and the keys each query sees.
    swa = architecture_card(lc.resolve_spec(tiny_cfg(*MLA, "attention.window=8")), dtype="bfloat16", context=64)
    assert swa["kv_cache_bytes_per_token"] == per_token and swa["kv_cache_bytes_full_context"] == per_token * 8
    attended = sum(min(i + 1, 8) for i in range(64)) / 64
    assert swa["flops_attention"] == pytest.approx(layers * 2 * 4 * (qk + v) * attended)


#: Presets that set an attention key MLA does not have: gpt-oss's sinks, SmolLM3's unrotated layers.
REFUSED_WITH_MLA = {"gpt_oss_20b": "attention.sinks", "smollm3_3b": "attention.rotary"}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_mla_builds_on_every_preset(preset):
    """With no MLA numbers set, `attention=mla` derives them from the preset's head_dim and
    builds on every preset but the encoder-decoder ones (it has no cross-attention form) and
    those that set an attention key MLA lacks (refused, naming the key)."""
    if preset in REFUSED_WITH_MLA:
        with pytest.raises(ConfigError) as info:
            lc.resolve_spec(lc.compose([f"model={preset}", "attention=mla"]))
        assert info.value.key == REFUSED_WITH_MLA[preset]
        return
    spec = lc.resolve_spec(lc.compose([f"model={preset}", "attention=mla"]))
    topology = spec.params["topology"].plugin
    if topology == "encoder_decoder":
        with pytest.raises(ConfigError, match="cross-attention"):
            architecture_card(spec)
        return
    h = spec.model.head_dim
    card = architecture_card(spec, dtype="bfloat16")
    rope = 2 * max(1, h // 4)
    if lc.resolve_spec(lc.compose([f"model={preset}"])).params["attention"].plugin == "mla":
        _, latent, rope_dim, *_ = spec.params["attention"].dims(spec.model)  # the preset's own numbers
        assert card["kv_cache_bytes_per_token"] == spec.model.n_layers * (latent + rope_dim) * 2
        return
    decodes = topology in ("decoder_only", "prefix_decoder")
    assert card["kv_cache_bytes_per_token"] == (spec.model.n_layers * (4 * h + rope) * 2 if decodes else 0)
    if h == 128:  # DeepSeek-V2/V3's widths
        assert spec.params["attention"].dims(spec.model)[1:] == (512, 64, 128, 128)


# ------------------------------------------------------------------ training and compile


def loss_of(out: lc.ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())


def test_tiny_mla_model_trains_one_step(tiny_cfg):
    torch.manual_seed(0)
    model = lc.build(tiny_cfg(*MLA, "model.q_lora_rank=24"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (4, 16), generator=g)
    y = torch.randint(0, 128, (4, 16), generator=g)
    loss = loss_of(model(x), y)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if ".attn." in name:
            assert p.grad.abs().max() > 0, name
    optimizer.step()
    with torch.no_grad():
        assert loss_of(model(x), y) < loss.detach()


@pytest.mark.slow
@pytest.mark.parametrize("whole", [True, False], ids=["whole", "regional"])
def test_mla_compiled_matches_eager(tiny_cfg, whole):
    cfg = tiny_cfg(*MLA, "model.q_lora_rank=24", "position.interleaved=true",
                   "model.rope_scaling={type:yarn,factor:4,original_max_seq_len:16,mscale:1.0,mscale_all_dim:1.0}")
    torch.manual_seed(0)
    model = lc.build(cfg)
    eager = copy.deepcopy(model)
    counters.clear()
    compiled = torch.compile(model, fullgraph=True) if whole else lc.compile(model, mode="default")
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (2, 16), generator=g)
    y = torch.randint(0, 128, (2, 16), generator=g)
    out_c, out_e = compiled(x), eager(x)
    torch.testing.assert_close(out_c.logits, out_e.logits, rtol=1e-5, atol=1e-5)
    loss_of(out_c, y).backward()
    loss_of(out_e, y).backward()
    named = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")
    assert not counters["graph_break"]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("override, key", [
    ("model.qk_rope_head_dim=7", "model.qk_rope_head_dim"),
    ("model.kv_lora_rank=0", "model.kv_lora_rank"),
    ("model.q_lora_rank=-4", "model.q_lora_rank"),
    ("model.v_head_dim=0", "model.v_head_dim"),
    ("attention.window=0", "attention.window"),
    ("model.attention_scale=0.0", "model.attention_scale"),
])
def test_mla_invalid_numbers_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        lc.resolve_spec(lc.compose([*TINY, *MLA, override]))
    assert info.value.key == key, info.value
    assert info.value.valid


def test_mla_odd_derived_rope_is_made_even():
    spec = lc.resolve_spec(lc.compose([*TINY, "attention=mla", "model.head_dim=10"]))
    assert spec.params["attention"].dims(spec.model).rope == 4


def test_mla_has_no_cross_attention_form():
    with pytest.raises(ConfigError) as info:
        lc.build(lc.compose([*TINY, *MLA, "topology=encoder_decoder"]), device="meta")
    assert info.value.key == "attention" and "cross-attention" in str(info.value)


def test_mla_with_2d_rope():
    """position=rope_2d (GLM) is rebuilt at MLA's rotary width too: without a prefix every
    token is prefix, so the first half of the rotary part turns by the position (rotate-half
    layout over its own width) and the second half by block position 0, not at all."""
    ctx = mla_ctx("position=rope_2d")
    attn = randomize_(ctx.build("attention").double(), std=0.25)
    assert attn.rotary.rotary_dim == 8 and ctx.position.rotary_dim == 16
    t = 9
    positions = torch.arange(t)

    def rotate(z):
        first = ref.rope_rotate(z[..., :4], positions, attn.rotary.inv_freq, 4, False)
        return torch.cat((first, z[..., 4:]), dim=-1)

    def expected(x, p):
        def norm(z, name):
            return ref.rmsnorm(z, p[f"{name}.weight"], 1e-6)

        return naive_mla(x, p, n_heads=4, q_lora=None, kv_lora=32, rope=8, nope=16, v_dim=12, causal=True,
                         norm=norm, rotate=rotate)

    check_forward_backward(lambda x: attn(x, lc.PositionInputs()), expected, attn, [randn(2, t, 64)],
                           RMSNORM_INSIDE)
    # With a prefix, the prefix length reaches the private tables (block positions count past it).
    model = lc.build(lc.compose([*TINY, *MLA, "position=rope_2d", "topology=glm"]))
    with torch.no_grad():
        ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
        assert (model(ids, prefix_len=3).logits - model(ids).logits).abs().max() > 1e-6


def test_mla_rotary_width_must_suit_the_position_plugin():
    with pytest.raises(ConfigError) as info:
        lc.build(lc.compose([*TINY, *MLA, "position=rope_2d", "model.qk_rope_head_dim=6"]), device="meta")
    assert info.value.key == "model.qk_rope_head_dim" and info.value.value == 6
    assert "rope_2d" in str(info.value) and info.value.valid == [4, 8]


def test_mla_keeps_rope_tables_in_float32_under_bf16():
    model = lc.build(lc.compose([*TINY, *MLA]), dtype=torch.bfloat16)
    attn = model.decoder.blocks[0].attn
    assert attn.rotary.inv_freq.dtype == torch.float32 and attn.o_proj.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 128, (1, 8)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()


# ------------------------------------------------------------------ QK-norm (gqa)


def naive_qk_norm_attention(x, p, *, n_heads: int, n_kv_heads: int, head_dim: int, norm, rotate,
                            whole: bool = False) -> torch.Tensor:
    """Causal attention where each head's query and key are normalized over head_dim (their
    own weights, shared across heads) before RoPE, as Qwen3's QK-norm does; `whole`: the
    queries and keys normalized over the whole projection before the heads split (OLMo-2)."""
    b, t, _ = x.shape
    q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
    group = n_heads // n_kv_heads
    allowed = ref.attention_allowed(t, True, None)
    w = p["qkv.weight"]
    outputs = []
    for bi in range(b):
        q_all = ref.linear(x[bi], w[:q_size])
        k_all = ref.linear(x[bi], w[q_size:q_size + kv_size])
        v_all = ref.linear(x[bi], w[q_size + kv_size:])
        if whole:
            q_all, k_all = norm(q_all, "q_norm"), norm(k_all, "k_norm")
        per_head = (lambda z, name: z) if whole else norm
        heads = []
        for h in range(n_heads):
            g = h // group
            q = rotate(per_head(q_all[:, h * head_dim:(h + 1) * head_dim], "q_norm"))
            k = rotate(per_head(k_all[:, g * head_dim:(g + 1) * head_dim], "k_norm"))
            v = v_all[:, g * head_dim:(g + 1) * head_dim]
            heads.append(ref.softmax_rows(q @ k.transpose(0, 1) / math.sqrt(head_dim), allowed) @ v)
        outputs.append(ref.linear(torch.cat(heads, dim=-1), p["out.weight"]))
    return torch.stack(outputs)


QK_NORM_CASES = {
    # id: (overrides, n_kv_heads, layernorm); "whole" in the id: model.qk_norm_scope=whole
    "rmsnorm": ([], 2, False),
    "whole_rmsnorm": (["model.qk_norm_scope=whole"], 2, False),
    "whole_rmsnorm_mqa_partial_rope": (["model.qk_norm_scope=whole", "attention=mqa", "model.rotary_fraction=0.5"],
                                       1, False),
    "whole_layernorm_mha": (["model.qk_norm_scope=whole", "norm=layernorm", "attention=mha"], 4, True),
    "rmsnorm_mqa_interleaved": (["attention=mqa", "position.interleaved=true"], 1, False),
    "rmsnorm_partial_rope": (["model.rotary_fraction=0.5"], 2, False),
    "layernorm_mha": (["norm=layernorm", "attention=mha"], 4, True),
}


@pytest.mark.parametrize("case", list(QK_NORM_CASES))
def test_gqa_qk_norm_matches_naive_reference(case):
    overrides, n_kv, layernorm = QK_NORM_CASES[case]
    ctx = make_ctx("model.qk_norm=true", *overrides)
    attn = randomize_(ctx.build("attention").double(), std=0.25)
    whole = "whole" in case
    assert attn.q_norm.weight.shape == ((64,) if whole else (16,))
    assert attn.k_norm.weight.shape == ((16 * n_kv,) if whole else (16,))
    pe = ctx.position.double()
    t = 9
    positions = torch.arange(t)
    pos = pe.attention_inputs(positions)

    def rotate(z):
        return ref.rope_rotate(z, positions, pe.inv_freq, pe.rotary_dim, pe.interleaved)

    def expected(x, p):
        def norm(z, name):
            if layernorm:
                return ref.layernorm(z, p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)
            return ref.rmsnorm(z, p[f"{name}.weight"], 1e-5)

        return naive_qk_norm_attention(x, p, n_heads=4, n_kv_heads=n_kv, head_dim=16, norm=norm, rotate=rotate,
                                       whole=whole)

    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(2, t, 64)],
                           TIGHT if layernorm else FP32_INSIDE)


def test_gqa_qk_norm_matches_qwen3():
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    ctx = make_ctx("model.qk_norm=true")
    attn = randomize_(ctx.build("attention").double(), std=0.25)
    pe = ctx.position
    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rms_norm_eps=1e-5, attention_bias=False, vocab_size=128, num_hidden_layers=1,
                         max_position_embeddings=64, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    hf, rotary = Qwen3Attention(config, layer_idx=0).double(), Qwen3RotaryEmbedding(config)
    b, t = 2, 9
    mask = torch.full((t, t), float("-inf"), dtype=F64).triu(1)[None, None]

    def expected(x, p):
        q, k, v = p["qkv.weight"].split((64, 32, 32))
        weights = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": p["out.weight"],
                   "q_norm.weight": p["q_norm.weight"], "k_norm.weight": p["k_norm.weight"]}
        cos, sin = rotary(x, torch.arange(t)[None].expand(b, t))
        return functional_call(hf, weights, (x, (cos, sin), mask))[0]

    pos = pe.attention_inputs(torch.arange(t))
    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(b, t, 64)], HF_TOL)


def test_gqa_whole_qk_norm_matches_olmo2():
    """model.qk_norm_scope=whole is OLMo-2's attention: RMSNorm over all heads' queries and keys."""
    from transformers import Olmo2Config
    from transformers.models.olmo2.modeling_olmo2 import Olmo2Attention, Olmo2RotaryEmbedding

    ctx = make_ctx("model.qk_norm=true", "model.qk_norm_scope=whole")
    attn = randomize_(ctx.build("attention").double(), std=0.25)
    config = Olmo2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         attention_bias=False, vocab_size=128, num_hidden_layers=1, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    hf, rotary = Olmo2Attention(config, layer_idx=0).double(), Olmo2RotaryEmbedding(config)
    b, t = 2, 9
    mask = torch.full((t, t), float("-inf"), dtype=F64).triu(1)[None, None]

    def expected(x, p):
        q, k, v = p["qkv.weight"].split((64, 32, 32))
        weights = {"q_proj.weight": q, "k_proj.weight": k, "v_proj.weight": v, "o_proj.weight": p["out.weight"],
                   "q_norm.weight": p["q_norm.weight"], "k_norm.weight": p["k_norm.weight"]}
        cos, sin = rotary(x, torch.arange(t)[None].expand(b, t))
        return functional_call(hf, weights, (x, (cos, sin), mask))[0]

    pos = ctx.position.attention_inputs(torch.arange(t))
    check_forward_backward(lambda x: attn(x, pos), expected, attn, [randn(b, t, 64)], HF_TOL)
