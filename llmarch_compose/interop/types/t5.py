"""T5 (T5ForConditionalGeneration): v1.0 (ReLU, a tied head scaled by d_model**-0.5)
and v1.1 / Flan-T5 (gated tanh-GELU, a head of its own, no scaling); mT5
(MT5ForConditionalGeneration): T5 v1.1's layout and function, whose head is never
scaled (MT5Config has no `scale_decoder_outputs`), read as a head of its own.

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

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (ACTIVATIONS, RMSNORM, activation_back, dense, family_guess, gqa, numbers, refuse, topology,
                     unused)

# T5Config's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "num_decoder_layers": None,
            "pad_token_id": 0, "eos_token_id": 1}
NUMBERS = {
    "d_model": "model.d_model", "num_layers": "model.n_layers", "num_heads": "model.n_heads",
    "d_kv": "model.head_dim", "d_ff": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "layer_norm_epsilon": "model.norm_eps", "n_positions": "model.max_seq_len",  # no T5Config field: kept if stated
    "relative_attention_num_buckets": "position.num_buckets",
    "relative_attention_max_distance": "position.max_distance",
}
# Our (activation plugin, GELU approximation) -> HF feed_forward_proj. transformers reads
# "gated-gelu" as the tanh GELU (gelu_new), so an exact gated GELU has no spelling.
ACTIVATIONS_BACK = {("relu", None): "relu", ("reglu", None): "gated-relu", ("gelu", "none"): "gelu",
                    ("gelu", "tanh"): "gelu_new", ("geglu", "tanh"): "gated-gelu", ("silu", None): "silu",
                    ("swiglu", None): "gated-silu"}
STACKS = {"encoder": "encoder.block.{i}.", "decoder": "decoder.block.{i}."}
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
    tied = hf.get("tie_word_embeddings", True)  # moot where scale_decoder_outputs is stated
    scale = hf.get("scale_decoder_outputs")
    return bool(scale) if scale is not None else tied is not False


def t5_overrides(hf: Mapping[str, Any]) -> list[str]:
    return _overrides(hf, "t5", scaled_head(hf))


def mt5_overrides(hf: Mapping[str, Any]) -> list[str]:
    # MT5Config forces tie_word_embeddings to true and transformers unties a stored lm_head that
    # differs (mT5's do): never scaled, the head reads as its own, as v1.1's does.
    unused(hf, "tie_word_embeddings")
    return _overrides(hf, "mt5", False)


def _overrides(hf: Mapping[str, Any], name: str, scaled: bool) -> list[str]:
    unused(hf, "dense_act_fn", "is_gated_act")  # the config classes derive both from feed_forward_proj, read below
    decoder_layers = hf["num_decoder_layers"] or hf["num_layers"]  # T5Config: None means num_layers
    if decoder_layers != hf["num_layers"]:
        raise ConfigError("num_decoder_layers", decoder_layers, "cannot be represented: our encoder and "
                          f"decoder have one depth, num_layers={hf['num_layers']}", [hf["num_layers"]])
    refuse(hf, "tie_encoder_decoder", "one set of block weights for both stacks")
    act, _ = feed_forward(hf)
    return [
        "topology=t5", "position=relative_bias", "norm=rmsnorm", f"activation={act}", "attention=mha",
        "ffn=dense", override("model.name", f"hf:{name}"), override("model.n_kv_heads", hf["num_heads"]),
        *numbers(hf, NUMBERS),
        # T5 folds the 1/sqrt(d) score scaling into its weights; no biases anywhere.
        override("model.attention_scale", 1.0), "model.attention_bias=false", "model.qkv_bias=false",
        "model.mlp_bias=false", "model.qk_norm=false",
        override("model.tie_embeddings", scaled), override("topology.scale_tied_head", scaled),
    ]


# Pre-norm stacks without biases or score scaling (folded into the weights), a relative
# position table per stack, a head tied and scaled (v1.0) or of its own (v1.1).
EXPRESSES = Expresses(
    groups={"position": {"relative_bias": {"num_buckets": ANY, "max_distance": ANY}}, "norm": RMSNORM,
            "activation": {"relu": {}, "reglu": {}, "silu": {}, "swiglu": {},
                           "gelu": {"approximate": only("none", "tanh")},
                           # transformers reads "gated-gelu" as the tanh GELU: an exact gated GELU has no spelling
                           "geglu": {"approximate": only("tanh")}},
            "attention": gqa(num_kv_heads=where(lambda v, spec: v == spec.model.n_heads, "model.n_heads",
                                                "grouped key/value heads"),
                             qkv_bias=only(False), out_bias=only(False), scale=only(1.0)),
            "ffn": dense(), "topology": {"encoder_decoder": topology(scale_tied_head=ANY)}},
    model={"head_dim": ANY, "tie_embeddings": ANY, "embedding_dim": only(None), "type_vocab_size": only(0)},
    stacks=("encoder", "decoder"),
    # Written exactly, but a tied head without v1.0's scaling reads back as a head of its own.
    guess_rules=(Rule("topology.scale_tied_head", lambda spec: spec.params["topology"].scale_tied_head,
                      lambda spec: not spec.model.tie_embeddings or spec.params["topology"].scale_tied_head,
                      [True], "a tied head without scaling as a guess (it reads back as untied; name "
                      "model_type=t5 to write it)"),))


# mT5: T5's declaration with a head never scaled; a tied head reads back as one of its own.
EXPRESSES_MT5 = Expresses(
    groups={**EXPRESSES.groups, "topology": {"encoder_decoder": topology(scale_tied_head=where(
        lambda v, spec: not (v and spec.model.tie_embeddings), "false (or an untied head, which it never scales)",
        "a tied head scaled by d_model**-0.5 (T5 v1.0)"))}},
    model=EXPRESSES.model, stacks=EXPRESSES.stacks,
    guess_rules=(Rule("model.tie_embeddings", lambda spec: spec.model.tie_embeddings,
                      lambda spec: not spec.model.tie_embeddings, [False],
                      "a tied head as a guess (it reads back as untied; name model_type=mt5 to write it)"),))

# MT5Config's defaults.
DEFAULTS_MT5 = {**DEFAULTS, "vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                "feed_forward_proj": "gated-gelu", "tie_word_embeddings": True}


def mt5_config(spec: Any) -> dict[str, Any]:
    out = hf_config(spec)
    del out["scale_decoder_outputs"]  # not an MT5Config field: its head is never scaled
    return out


def hf_config(spec: Any) -> dict[str, Any]:
    m, position = spec.model, spec.params["position"]
    tied = m.tie_embeddings
    return {
        "d_model": m.d_model, "d_kv": m.head_dim, "d_ff": spec.params["ffn"].hidden, "num_layers": m.n_layers,
        "num_decoder_layers": m.n_layers, "num_heads": m.n_heads, "vocab_size": m.vocab_size,
        "relative_attention_num_buckets": position.num_buckets,
        "relative_attention_max_distance": position.max_distance, "layer_norm_epsilon": spec.params["norm"].eps,
        "feed_forward_proj": activation_back(spec, ACTIVATIONS_BACK),
        "is_encoder_decoder": True, "tie_word_embeddings": tied,
        # transformers 5 reads the head's scaling here (and ties the head regardless, unless the
        # stored lm_head differs); older versions read it from tie_word_embeddings.
        "scale_decoder_outputs": bool(tied and spec.params["topology"].scale_tied_head),
        # T5 starts decoding from its padding id.
        "decoder_start_token_id": 0 if m.pad_token_id is None else m.pad_token_id,
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
                                    "cat", (spec.params["ffn"].hidden,) * 2))
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

TYPES = (ModelType("t5", "T5ForConditionalGeneration", t5_overrides, hf_config, tensors, IGNORE,
                   extra_fields={"dense_act_fn": None, "is_gated_act": None, "scale_decoder_outputs": None,
                                 "tie_word_embeddings": None}, expresses=EXPRESSES,
                   defaults=DEFAULTS),
         ModelType("mt5", "MT5ForConditionalGeneration", mt5_overrides, mt5_config, tensors, IGNORE,
                   extra_fields={"dense_act_fn": None, "is_gated_act": None}, expresses=EXPRESSES_MT5, defaults=DEFAULTS_MT5))

guess = family_guess(TYPES)
