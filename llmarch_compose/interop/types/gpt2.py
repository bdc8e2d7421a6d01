"""GPT-2 (GPT2LMHeadModel): pre-norm LayerNorm blocks with biases, learned positions,
a tied head.

The checkpoint layout: `transformer.wte` / `transformer.wpe`, `transformer.h.{i}.ln_1`,
`attn.c_attn` (q|k|v already fused), `attn.c_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`,
`transformer.ln_f`, and `lm_head` only when untied. The projections are Conv1D,
stored [in, out]: each weight is transposed (`t`), the biases copied.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ..hf import ModelType, TensorRule, override
from .common import activation, ensure_fits, first_failed, numbers, refuse, wrong_plugin_or_topology

# GPT2Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
            "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "scale_attn_weights": True, "tie_word_embeddings": True}
NUMBERS = {
    "n_embd": "model.d_model", "n_layer": "model.n_layers", "n_head": "model.n_heads",
    "vocab_size": "model.vocab_size", "n_positions": "model.max_seq_len", "layer_norm_epsilon": "model.norm_eps",
}
# Our (activation plugin, GELU approximation) -> HF activation_function
ACTIVATIONS_BACK = {("gelu", "tanh"): "gelu_new", ("gelu", "none"): "gelu", ("relu", None): "relu",
                    ("silu", None): "silu"}
LAYER = "transformer.h.{i}."
BLOCK = "decoder.blocks.{i}."
# Pre-norm decoder blocks and a plain head: every other topology option at its default.
TOPOLOGY = {"norm_position": "pre", "parallel_residual": False, "residual": "standard", "share_layers": False,
            "embedding_norm": False, "mlm_transform": False, "head_bias": "none", "scale_tied_head": False,
            "normalize_head": False}


def gpt2_overrides(hf: Mapping[str, Any]) -> list[str]:
    hf = {**DEFAULTS, **hf}
    refuse(hf, "scale_attn_by_inverse_layer_idx", "attention scores divided by the layer index + 1 per layer")
    refuse(hf, "reorder_and_upcast_attn", "attention scores upcast to fp32 in a reordered product")
    refuse(hf, "add_cross_attention", "cross-attention blocks in a decoder-only model")
    out = [
        "position=learned", "norm=layernorm", f"activation={activation(hf, 'activation_function', gated=False)}",
        "attention=mha", "ffn=dense", "topology=decoder_only", override("model.name", "hf:gpt2"),
        override("model.n_kv_heads", hf["n_head"]), override("model.ffn_dim", hf["n_inner"] or 4 * hf["n_embd"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        "model.attention_bias=true", "model.mlp_bias=true", *numbers(hf, NUMBERS),
    ]
    if not hf["scale_attn_weights"]:  # raw q.k scores
        out.append(override("model.attention_scale", 1.0))
    return out


def _mismatch(spec: Any) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` GPT-2 cannot hold, as (key, value, why), or None."""
    m, p = spec.model, spec.params
    wanted = {"topology": "decoder_only", "position": "learned", "norm": "layernorm", "attention": "gqa",
              "ffn": "dense"}
    problem = wrong_plugin_or_topology(spec, "GPT-2", wanted, TOPOLOGY)
    if problem:
        return problem
    attention, act = p["attention"], p["activation"]
    checks = [
        ("model.layer_pattern", list(m.layer_pattern), not spec.layer_params, "GPT-2 has the same layer throughout"),
        ("activation", act.name, (act.plugin, getattr(act, "approximate", None)) in ACTIVATIONS_BACK,
         f"GPT-2 has one of {sorted(set(ACTIVATIONS_BACK.values()))}"),
        ("position.offset", p["position"].offset, p["position"].offset == 0, "GPT-2 has no offset"),
        ("norm.bias", p["norm"].bias, p["norm"].bias, "GPT-2's LayerNorms have a bias"),
        ("attention.num_kv_heads", attention.num_kv_heads, attention.num_kv_heads == m.n_heads,
         "GPT-2 has multi-head attention"),
        ("attention.qkv_bias", attention.qkv_bias, attention.qkv_bias and attention.out_bias,
         "GPT-2 biases every projection"),
        ("attention.window", attention.window, attention.window is None, "GPT-2 attends to every earlier token"),
        ("attention.qk_norm", attention.qk_norm, not attention.qk_norm, "GPT-2 has no QK-norm"),
        ("attention.scale", attention.scale, attention.scale in (None, 1.0),
         "GPT-2 scales by 1/sqrt(head_dim) or not at all"),
        ("model.head_dim", m.head_dim, m.head_dim * m.n_heads == m.d_model, "GPT-2 has head_dim = d_model / n_heads"),
        ("ffn.bias", p["ffn"].bias, p["ffn"].bias, "GPT-2 biases the FFN"),
        ("model.type_vocab_size", m.type_vocab_size, m.type_vocab_size == 0, "GPT-2 has no token types"),
        ("model.embedding_dim", m.embedding_dim, m.embedding_width == m.d_model, "GPT-2 has no factorized embeddings"),
    ]
    return first_failed(checks)


def hf_config(spec: Any) -> dict[str, Any]:
    ensure_fits(_mismatch(spec), "gpt2")
    m, act = spec.model, spec.params["activation"]
    return {
        "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads, "n_inner": m.ffn_dim,
        "vocab_size": m.vocab_size, "n_positions": m.max_seq_len, "layer_norm_epsilon": m.norm_eps,
        "activation_function": ACTIVATIONS_BACK[act.plugin, getattr(act, "approximate", None)],
        "tie_word_embeddings": m.tie_embeddings, "scale_attn_weights": spec.params["attention"].scale is None,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False, "add_cross_attention": False,
    }


def tensors(spec: Any) -> list[TensorRule]:
    rules = [
        TensorRule("embed.tokens.weight", ("transformer.wte.weight",)),
        TensorRule("position.table.weight", ("transformer.wpe.weight",)),
        TensorRule(BLOCK + "attn.qkv.weight", (LAYER + "attn.c_attn.weight",), "t"),
        TensorRule(BLOCK + "attn.out.weight", (LAYER + "attn.c_proj.weight",), "t"),
        TensorRule(BLOCK + "ffn.up.weight", (LAYER + "mlp.c_fc.weight",), "t"),
        TensorRule(BLOCK + "ffn.down.weight", (LAYER + "mlp.c_proj.weight",), "t"),
        TensorRule(BLOCK + "attn.qkv.bias", (LAYER + "attn.c_attn.bias",)),
        TensorRule(BLOCK + "attn.out.bias", (LAYER + "attn.c_proj.bias",)),
        TensorRule(BLOCK + "ffn.up.bias", (LAYER + "mlp.c_fc.bias",)),
        TensorRule(BLOCK + "ffn.down.bias", (LAYER + "mlp.c_proj.bias",)),
    ]
    for ours, theirs in (("attn_norm", LAYER + "ln_1"), ("ffn_norm", LAYER + "ln_2"),
                         ("decoder.final_norm", "transformer.ln_f")):
        ours = ours if ours.startswith("decoder.") else BLOCK + ours
        rules += [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# Checkpoints written before transformers 4.x dropped them store the causal mask
# (`attn.bias`) and its fill value (`attn.masked_bias`) as buffers; a tied
# checkpoint may still store lm_head.weight (a copy of the embeddings).
IGNORE = (".attn.bias", ".attn.masked_bias", "lm_head.weight")

# openai-community/gpt2 stores GPT2Model's names without the "transformer." prefix.
TYPES = (ModelType("gpt2", "GPT2LMHeadModel", gpt2_overrides, hf_config, tensors, IGNORE, prefix="transformer."),)


def guess(spec: Any) -> str | None:
    return "gpt2" if _mismatch(spec) is None else None
