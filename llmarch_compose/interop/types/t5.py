"""T5 (T5ForConditionalGeneration): v1.0 (ReLU, a tied head scaled by d_model**-0.5)
and v1.1 / Flan-T5 (gated tanh-GELU, a head of its own, no scaling).

The checkpoint layout: `shared` (the token table both stacks read),
`{encoder,decoder}.block.{i}.layer.0.SelfAttention.{q,k,v,o}` (no biases, no
score scaling), `decoder.block.{i}.layer.1.EncDecAttention.{q,k,v,o}`, the FFN in
the last layer of each block (`DenseReluDense.wi`/`wo`, or `wi_0` (gated) |
`wi_1` when gated), a bias-free RMS `layer_norm` before each sublayer,
`{encoder,decoder}.final_layer_norm`, and `lm_head` when the head is untied. The
relative position table lives in block 0 of each stack
(`SelfAttention.relative_attention_bias`) and serves every layer: our per-stack
`encoder_position` / `position` table.

Tied or not: transformers 5 forces `tie_word_embeddings` to true in every T5
config and records v1.1's unscaled head as `scale_decoder_outputs: false`, while
a Flan-T5 it loaded and saved again still stores its own `lm_head.weight` (it
unties when the stored values differ). So the head's scaling decides: scaled
(v1.0) means tied, unscaled (v1.1) means a head of its own. A model transformers
5 built from scratch as v1.1 is tied *and* unscaled and stores no lm_head:
from_hf names the missing `lm_head.weight`; load it with the override
`model.tie_embeddings=true` (the head stays unscaled).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..hf import ModelType, TensorRule, override
from .common import ACTIVATIONS, ensure_fits, first_failed, numbers, refuse, wrong_plugin_or_topology

# T5Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "n_positions": 512}
NUMBERS = {
    "d_model": "model.d_model", "num_layers": "model.n_layers", "num_heads": "model.n_heads",
    "d_kv": "model.head_dim", "d_ff": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "layer_norm_epsilon": "model.norm_eps", "n_positions": "model.max_seq_len",
    "relative_attention_num_buckets": "position.num_buckets",
    "relative_attention_max_distance": "position.max_distance",
}
# Our (activation plugin, GELU approximation) -> HF feed_forward_proj. transformers reads
# "gated-gelu" as the tanh GELU (gelu_new), so an exact gated GELU has no spelling.
ACTIVATIONS_BACK = {("relu", None): "relu", ("reglu", None): "gated-relu", ("gelu", "none"): "gelu",
                    ("gelu", "tanh"): "gelu_new", ("geglu", "tanh"): "gated-gelu", ("silu", None): "silu",
                    ("swiglu", None): "gated-silu"}
STACKS = {"encoder": "encoder.block.{i}.", "decoder": "decoder.block.{i}."}
# Pre-norm stacks and a plain head: every other topology option at its default.
TOPOLOGY = {"norm_position": "pre", "parallel_residual": False, "residual": "standard", "share_layers": False,
            "embedding_norm": False, "mlm_transform": False, "head_bias": "none", "normalize_head": False}


def feed_forward(hf: Mapping[str, Any]) -> tuple[str, bool]:
    """Our activation for `feed_forward_proj` ("relu", "gated-gelu", ...), and whether it is gated;
    parsed as transformers does ("gated-gelu" is the tanh GELU)."""
    proj = hf["feed_forward_proj"]
    parts = str(proj).split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    name = "gelu_new" if proj == "gated-gelu" else parts[-1]
    if len(parts) > 2 or (len(parts) == 2 and not gated) or name not in ACTIVATIONS:
        raise ConfigError("feed_forward_proj", proj, "no plugin for this feed-forward activation",
                          sorted({*ACTIVATIONS, *(f"gated-{a}" for a in ACTIVATIONS)}))
    return ACTIVATIONS[name][0 if gated else 1], gated


def scaled_head(hf: Mapping[str, Any]) -> bool:
    """Whether the decoder's output is scaled by d_model**-0.5 before the head, as transformers
    5 decides it: `scale_decoder_outputs`, or (a config written before it) a tied head."""
    scale = hf.get("scale_decoder_outputs")
    return bool(scale) if scale is not None else hf.get("tie_word_embeddings", True) is not False


def t5_overrides(hf: Mapping[str, Any]) -> list[str]:
    hf = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    decoder_layers = hf.get("num_decoder_layers", hf["num_layers"])
    if decoder_layers != hf["num_layers"]:
        raise ConfigError("num_decoder_layers", decoder_layers, "cannot be represented: our encoder and "
                          f"decoder have one depth, num_layers={hf['num_layers']}", [hf["num_layers"]])
    refuse(hf, "tie_encoder_decoder", "one set of block weights for both stacks")
    act, _ = feed_forward(hf)
    scaled = scaled_head(hf)
    return [
        "topology=t5", "position=relative_bias", "norm=rmsnorm", f"activation={act}", "attention=mha",
        "ffn=dense", override("model.name", "hf:t5"), override("model.n_kv_heads", hf["num_heads"]),
        *numbers(hf, NUMBERS),
        # T5 folds the 1/sqrt(d) score scaling into its weights; no biases anywhere.
        override("model.attention_scale", 1.0), "model.attention_bias=false", "model.qkv_bias=false",
        "model.mlp_bias=false", "model.qk_norm=false",
        override("model.tie_embeddings", scaled), override("topology.scale_tied_head", scaled),
    ]


def _mismatch(spec: Any) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` T5 cannot hold, as (key, value, why), or None."""
    m, p = spec.model, spec.params
    wanted = {"topology": "encoder_decoder", "position": "relative_bias", "norm": "rmsnorm", "attention": "gqa",
              "ffn": "dense"}
    problem = wrong_plugin_or_topology(spec, "T5", wanted, TOPOLOGY)
    if problem:
        return problem
    attention, act = p["attention"], p["activation"]
    checks = [
        ("model.layer_pattern", list(m.layer_pattern), not spec.layer_params, "T5 has the same layer throughout"),
        ("activation", act.name, (act.plugin, getattr(act, "approximate", None)) in ACTIVATIONS_BACK,
         f"T5's feed_forward_proj is one of {sorted(ACTIVATIONS_BACK.values())}"),
        ("attention.num_kv_heads", attention.num_kv_heads, attention.num_kv_heads == m.n_heads,
         "T5 has multi-head attention"),
        ("attention.qkv_bias", attention.qkv_bias, not attention.qkv_bias, "T5's projections have no bias"),
        ("attention.out_bias", attention.out_bias, not attention.out_bias, "T5's projections have no bias"),
        ("attention.window", attention.window, attention.window is None, "T5 attends to every allowed token"),
        ("attention.qk_norm", attention.qk_norm, not attention.qk_norm, "T5 has no QK-norm"),
        ("attention.scale", attention.scale, attention.scale == 1.0, "T5 does not scale attention scores"),
        ("ffn.bias", p["ffn"].bias, not p["ffn"].bias, "T5's FFN has no bias"),
        ("model.type_vocab_size", m.type_vocab_size, m.type_vocab_size == 0, "T5 has no token types"),
        ("model.embedding_dim", m.embedding_dim, m.embedding_width == m.d_model, "T5 has no factorized embeddings"),
    ]
    return first_failed(checks)


def hf_config(spec: Any) -> dict[str, Any]:
    ensure_fits(_mismatch(spec), "t5")
    m, act, position = spec.model, spec.params["activation"], spec.params["position"]
    tied = m.tie_embeddings
    return {
        "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": m.ffn_dim, "num_layers": m.n_layers,
        "num_decoder_layers": m.n_layers, "num_heads": m.n_heads, "vocab_size": m.vocab_size,
        "relative_attention_num_buckets": position.num_buckets,
        "relative_attention_max_distance": position.max_distance, "layer_norm_epsilon": m.norm_eps,
        "feed_forward_proj": ACTIVATIONS_BACK[act.plugin, getattr(act, "approximate", None)],
        "is_encoder_decoder": True, "tie_word_embeddings": tied,
        # transformers 5 reads the head's scaling here (and ties the head regardless, unless the
        # stored lm_head differs); older versions read it from tie_word_embeddings.
        "scale_decoder_outputs": bool(tied and spec.params["topology"].scale_tied_head),
        "decoder_start_token_id": 0, "pad_token_id": 0, "eos_token_id": 1,
    }


def tensors(spec: Any) -> list[TensorRule]:
    m = spec.model
    inner = m.n_heads * m.head_dim
    gated = spec.plugin("activation").cls.gated
    rules = [
        TensorRule("encoder_embed.tokens.weight", ("shared.weight",)),
        TensorRule("embed.tokens.weight", ("shared.weight",)),  # the same table, one more state-dict name
    ]
    for stack, layer in STACKS.items():
        block = stack + ".blocks.{i}."
        ffn = layer + ("layer.2." if stack == "decoder" else "layer.1.")
        attn = layer + "layer.0.SelfAttention."
        rules += [
            TensorRule(block + "attn_norm.weight", (layer + "layer.0.layer_norm.weight",)),
            TensorRule(block + "attn.qkv.weight", tuple(attn + f"{p}.weight" for p in "qkv"), "cat",
                       (inner, inner, inner)),
            TensorRule(block + "attn.out.weight", (attn + "o.weight",)),
            TensorRule(block + "ffn_norm.weight", (ffn + "layer_norm.weight",)),
            TensorRule(block + "ffn.down.weight", (ffn + "DenseReluDense.wo.weight",)),
            TensorRule(f"{stack}.final_norm.weight", (f"{stack}.final_layer_norm.weight",)),
            # One table per stack, stored with block 0's self-attention.
            TensorRule(("encoder_" if stack == "encoder" else "") + "position.table.weight",
                       (stack + ".block.0.layer.0.SelfAttention.relative_attention_bias.weight",)),
        ]
        if gated:  # wi_0 is the activated gate, wi_1 the linear half: our [gate | up]
            rules.append(TensorRule(block + "ffn.up.weight", (ffn + "DenseReluDense.wi_0.weight",
                                                              ffn + "DenseReluDense.wi_1.weight"),
                                    "cat", (m.ffn_dim, m.ffn_dim)))
        else:
            rules.append(TensorRule(block + "ffn.up.weight", (ffn + "DenseReluDense.wi.weight",)))
    cross, block = STACKS["decoder"] + "layer.1.", "decoder.blocks.{i}."
    rules += [
        TensorRule(block + "cross_norm.weight", (cross + "layer_norm.weight",)),
        TensorRule(block + "cross_attn.q.weight", (cross + "EncDecAttention.q.weight",)),
        TensorRule(block + "cross_attn.kv.weight", (cross + "EncDecAttention.k.weight",
                                                    cross + "EncDecAttention.v.weight"), "cat", (inner, inner)),
        TensorRule(block + "cross_attn.out.weight", (cross + "EncDecAttention.o.weight",)),
    ]
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# Each stack's embed_tokens is `shared` itself (older checkpoints store the copies), and
# checkpoints converted from Mesh TensorFlow carry an unused relative table for the
# decoder's first cross-attention. lm_head.weight is deliberately not here: a tied (scaled)
# mapping that meets one refuses it rather than drop a head that may differ.
IGNORE = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
          "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight")

TYPES = (ModelType("t5", "T5ForConditionalGeneration", t5_overrides, hf_config, tensors, IGNORE),)


def guess(spec: Any) -> str | None:
    if _mismatch(spec) is not None:
        return None
    # A tied, unscaled head is written correctly, but reads back as untied (see above): not a guess.
    return None if spec.model.tie_embeddings and not spec.params["topology"].scale_tied_head else "t5"
