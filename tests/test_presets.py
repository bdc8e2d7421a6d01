"""The presets against their published figures, built on `meta`, and the cost
model's FLOPs, KV-cache and MoE active-parameter figures checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import llmarch_compose as lc
from llmarch_compose.model.card import architecture_card
from llmarch_compose.config.spec import resolve_spec
from llmarch_compose.tasks.summary import card_for

PUBLISHED = {
    "gpt2": (124_439_808, 124_439_808),
    "llama2_7b": (6_738_415_616, 6_738_415_616),
    "llama2_70b": (68_976_648_192, 68_976_648_192),
    "llama3_8b": (8_030_261_248, 8_030_261_248),
    "mistral_7b": (7_241_732_096, 7_241_732_096),
    "mixtral_8x7b": (46_702_792_704, 12_879_925_248),
}


class _NonMetaTensors(TorchDispatchMode):
    """Records every op that produces a tensor off the meta device."""

    def __init__(self):
        super().__init__()
        self.real = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.real += [(func, tuple(t.shape)) for t in tree_leaves(out)
                      if isinstance(t, torch.Tensor) and not t.is_meta]
        return out


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_preset_parameter_counts(preset):
    total, active = PUBLISHED[preset]
    cfg = lc.compose([f"model={preset}"])
    card = architecture_card(resolve_spec(cfg))
    assert card["model"] == preset
    assert card["params_total"] == total
    assert card["params_active"] == active
    assert card["params_embedding"] + card["params_non_embedding"] == total

    recorder = _NonMetaTensors()
    with recorder:
        model = lc.build(cfg, device="meta")
    assert sum(p.numel() for p in model.parameters()) == total
    # Nothing is allocated: every parameter and buffer is on meta, and no op made a real tensor.
    assert all(p.is_meta for p in model.parameters())
    assert all(b.is_meta for b in model.buffers())
    assert recorder.real == []


def test_tied_embeddings_counted_once():
    model = lc.build(lc.compose(["model=gpt2"]), device="meta")
    assert model.head.weight is None and model.head.tied is model.embed.tokens
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert sum(p.numel() for p in model.parameters()) == 124_439_808
    assert len(names) == len(list(model.parameters()))  # the head reuses the embedding, no extra tensor


@pytest.mark.parametrize("attention, kv_heads", [("mha", 64), ("gqa", 8), ("mqa", 1)])
def test_kv_cache_per_token_llama2_70b(attention, kv_heads):
    card = architecture_card(resolve_spec(lc.compose(["model=llama2_70b", f"attention={attention}"])))
    layers, head_dim, bf16 = 80, 128, 2
    assert card["dimensions"]["n_kv_heads"] == kv_heads
    assert card["kv_cache_bytes_per_token"] == 2 * layers * kv_heads * head_dim * bf16
    assert card["kv_cache_bytes_full_context"] == card["kv_cache_bytes_per_token"] * 4096


def test_kv_cache_ratio_mha_gqa_mqa():
    per_token = {a: architecture_card(resolve_spec(lc.compose(["model=llama2_70b", f"attention={a}"])))
                 ["kv_cache_bytes_per_token"] for a in ("mha", "gqa", "mqa")}
    assert per_token["mha"] == 64 * per_token["mqa"]
    assert per_token["gqa"] == 8 * per_token["mqa"]
    assert per_token["mqa"] == 2 * 80 * 1 * 128 * 2


def test_kv_cache_dtype_and_window():
    cfg = lc.compose(["model=mistral_7b", "task=summary", "task.dtype=float32"])
    card = card_for(cfg)
    per_token = 2 * 32 * 8 * 128 * 4
    assert card["kv_cache_bytes_per_token"] == per_token
    # The 4096-token window caps the cache below the 32768-token context.
    assert card["context"] == 32768
    assert card["kv_cache_bytes_full_context"] == per_token * 4096
    unwindowed = card_for(lc.compose(["model=mistral_7b", "attention=gqa", "task=summary", "task.dtype=float32"]))
    assert unwindowed["kv_cache_bytes_full_context"] == per_token * 32768


def test_flops_per_token_llama2_7b_by_hand():
    card = architecture_card(resolve_spec(lc.compose(["model=llama2_7b"])))
    d, layers, heads, head_dim, ffn, vocab, ctx = 4096, 32, 32, 128, 11008, 32000, 4096
    qkv = d * 3 * d  # MHA: q, k and v each d x d
    out = d * d
    mlp = d * 2 * ffn + ffn * d  # SwiGLU: gate and up, then down
    lm_head = d * vocab
    matrix_params = layers * (qkv + out + mlp)
    # The card's non-embedding params are these matrices, the LM head and the norm weights.
    assert card["params_non_embedding"] == matrix_params + lm_head + (2 * layers + 1) * d
    # Per layer: q.k and the weighted sum of v, 2 FLOPs per multiply-add over head_dim,
    # for each key a causal query sees: on average (ctx + 1) / 2.
    attention = layers * heads * 2 * (2 * head_dim) * (ctx + 1) / 2
    assert card["context"] == ctx
    assert card["flops_matmul"] == 2 * (matrix_params + lm_head)
    assert card["flops_attention"] == attention
    assert card["flops_per_token"] == 2 * (matrix_params + lm_head) + attention


def test_flops_tied_head_and_context_gpt2():
    """A tied head still costs its matrix product; a shorter context shrinks only attention."""
    cfg = lc.compose(["model=gpt2", "task=summary", "task.context=128"])
    card = card_for(cfg)
    d, layers, ffn, vocab, ctx = 768, 12, 3072, 50257, 128
    matrices = layers * (d * 3 * d + d * d + d * ffn + ffn * d) + vocab * d
    assert card["flops_matmul"] == 2 * matrices
    assert card["flops_attention"] == layers * 12 * 4 * 64 * (ctx + 1) / 2
    assert card["kv_cache_bytes_full_context"] == card["kv_cache_bytes_per_token"] * ctx


def test_swa_attention_flops_capped_by_window(tiny_cfg):
    window, ctx = 8, 64
    full = card_for(tiny_cfg("task=summary"))
    swa = card_for(tiny_cfg("task=summary", "attention=swa", f"model.window={window}"))
    assert swa["flops_matmul"] == full["flops_matmul"]
    layers, heads, head_dim = 2, 4, 16
    mean_seen = sum(min(i + 1, window) for i in range(ctx)) / ctx
    assert swa["flops_attention"] == pytest.approx(layers * 4 * heads * head_dim * mean_seen)
    assert full["flops_attention"] == pytest.approx(layers * 4 * heads * head_dim * (ctx + 1) / 2)


def test_moe_active_params_tiny(tiny_cfg):
    cfg = tiny_cfg("ffn=moe", "task=summary")
    card = card_for(cfg)
    d, f, layers, experts, k = 64, 96, 2, 8, 2
    expert_params = layers * experts * (d * 2 * f + f * d)  # gated: w_in is d x 2f
    model = lc.build(cfg, device="meta")
    assert expert_params == sum(p.numel() for n, p in model.named_parameters() if n.endswith(("w_in", "w_out")))
    total = sum(p.numel() for p in model.parameters())
    assert card["params_total"] == total
    assert card["params_active"] == total - (experts - k) * expert_params // experts
    assert card["params_active"] < card["params_total"]
    # Dense layers are fully active.
    dense = card_for(tiny_cfg("task=summary"))
    assert dense["params_active"] == dense["params_total"]


def test_moe_top_k_changes_active_not_total(tiny_cfg):
    cards = {k: card_for(tiny_cfg("ffn=moe", "task=summary", f"model.experts_per_token={k}")) for k in (1, 2, 8)}
    assert len({c["params_total"] for c in cards.values()}) == 1
    per_expert = 2 * (64 * 2 * 96 + 96 * 64)  # both layers
    assert cards[2]["params_active"] - cards[1]["params_active"] == per_expert
    assert cards[8]["params_active"] == cards[8]["params_total"]


def test_memory_figures():
    card = architecture_card(resolve_spec(lc.compose(["model=llama2_7b"])))
    total = card["params_total"]
    assert card["inference_weight_bytes"] == 2 * total
    mem = card["training_memory_fp32_adamw_bytes"]
    assert mem == {"weights": 4 * total, "gradients": 4 * total, "adamw_states": 8 * total, "total": 16 * total}
