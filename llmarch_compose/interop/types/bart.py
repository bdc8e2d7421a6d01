"""BART (BartForConditionalGeneration): post-norm encoder-decoder with biases
everywhere, learned positions offset by 2, a LayerNorm on each stack's embeddings,
and the final_logits_bias buffer added to the logits.

The checkpoint layout: `model.shared` (the token table both stacks read),
`model.{encoder,decoder}.embed_positions` (max_position_embeddings + 2 rows: our
per-stack `encoder_position` / `position` table with model.position_offset=2),
`model.{encoder,decoder}.layernorm_embedding` (our `encoder_embed.norm` /
`embed.norm`), `model.{encoder,decoder}.layers.{i}.self_attn.{q,k,v,out}_proj`,
`self_attn_layer_norm`, the decoder's `encoder_attn.*` and `encoder_attn_layer_norm`,
`fc1`, `fc2`, `final_layer_norm` (after the FFN: post-norm), `final_logits_bias`
([1, vocab], our [vocab] buffer `head.bias`); the head is tied to `model.shared`.

mBART (MBartForConditionalGeneration) is BART made pre-norm: each stack ends in a
LayerNorm of its own (`model.{encoder,decoder}.layer_norm`, our `{stack}.final_norm`),
and `scale_embedding` (the token embeddings times sqrt(d_model), before the positions
are added) is ours `topology.scale_embeddings`. Its older configs say so in fields
MBartConfig does not define (`normalize_before`, `add_final_layer_norm`, ...): read
at mBART's values, refused at others.

Marian (MarianMTModel) is BART with fixed sinusoidal positions (the sines of every
frequency, then the cosines: our `position=sinusoidal` with `layout: halves`; transformers
may store the tables as `model.{encoder,decoder}.embed_positions`, which are skipped),
no norm on the embeddings, and `scale_embedding` as mBART has it. Refused: token tables
of each stack's own (`share_encoder_decoder_embeddings: false`) and a `decoder_vocab_size`
other than `vocab_size`.

Refused in BART: the mBART-style options older BART configs still carry (pre-norm
`normalize_before`, `add_final_layer_norm`), `scale_embedding` (token embeddings
times sqrt(d_model)), encoder and decoder that differ in depth, heads or width, and
`tie_word_embeddings: false` (transformers 5 then unties the token tables of the two
stacks as well: `model.encoder.embed_tokens` and `model.decoder.embed_tokens` are
tables of their own, `model.shared` goes unused; ours is one table).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (MHA_BIASED, PLAIN, PLAIN_BACK, SPLIT_HEADS, activation, activation_back, dense, family_guess,
                     numbers, refuse, topology)

# BartConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50265, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
            "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
            "decoder_attention_heads": 16, "activation_function": "gelu", "d_model": 1024,
            "tie_word_embeddings": True, "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0,
            "eos_token_id": 2, "decoder_start_token_id": 2}
NUMBERS = {
    "d_model": "model.d_model", "encoder_layers": "model.n_layers", "encoder_attention_heads": "model.n_heads",
    "encoder_ffn_dim": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len",
}
# Each decoder field must equal its encoder twin: our stacks share these numbers.
TWINS = {"decoder_layers": "encoder_layers", "decoder_attention_heads": "encoder_attention_heads",
         "decoder_ffn_dim": "encoder_ffn_dim"}
OFFSET = 2  # rows of each position table before position 0
EPS = 1e-5  # BART's LayerNorms are nn.LayerNorm's default
STACKS = {"encoder": "model.encoder.", "decoder": "model.decoder."}
# Why an untied BART is refused both ways: transformers 5 then unties every token table,
# so the encoder and the decoder each embed with their own (besides an unused `shared`).
UNTIED = ("transformers then gives each stack a token table of its own besides an unused model.shared; "
          "our stacks share one")
#: Fields older mBART config.json files carry that MBartConfig does not define, at mBART's values.
MBART_FIELDS = {"normalize_before": True, "add_final_layer_norm": True, "normalize_embedding": True,
                "static_position_embeddings": False, "add_bias_logits": False, "extra_pos_embeddings": OFFSET}
# MBartConfig()'s defaults.
DEFAULTS_MBART = {**DEFAULTS, "decoder_start_token_id": None, "forced_eos_token_id": 2}


def bart_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "scale_embedding", "token embeddings multiplied by sqrt(d_model)")
    refuse(hf, "normalize_before", "pre-norm layers (mBART)")
    refuse(hf, "add_final_layer_norm", "a final LayerNorm on each stack (mBART)")
    return _overrides(hf, "bart")


def mbart_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "normalize_before", "post-norm layers (BART)", allowed=(None, True))
    refuse(hf, "add_final_layer_norm", "pre-norm stacks without their final LayerNorm", allowed=(None, True))
    return [*_overrides(hf, "mbart"), "topology.norm_position=pre",
            override("topology.scale_embeddings", bool(hf["scale_embedding"]))]


# MarianConfig()'s defaults.
DEFAULTS_MARIAN = {**DEFAULTS, "vocab_size": 58101, "decoder_vocab_size": None, "decoder_start_token_id": 58100,
                   "pad_token_id": 58100, "eos_token_id": 0, "bos_token_id": None, "forced_eos_token_id": 0,
                   "share_encoder_decoder_embeddings": True}


def marian_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "share_encoder_decoder_embeddings", "a token table of each stack's own", allowed=(True,))
    vocab, target = hf["vocab_size"], hf["decoder_vocab_size"]
    if target not in (None, vocab):
        raise ConfigError("decoder_vocab_size", target, f"cannot be represented: our stacks share one token "
                          f"table of vocab_size={vocab}", [None, vocab])
    out = [o for o in _overrides(hf, "marian") if not o.startswith(("position=", "model.position_offset="))]
    return [*out, "position=sinusoidal", "position.layout=halves", "topology.embedding_norm=false",
            override("topology.scale_embeddings", bool(hf["scale_embedding"]))]


def _overrides(hf: Mapping[str, Any], name: str) -> list[str]:
    refuse(hf, "add_bias_logits", "a logits bias parameter besides final_logits_bias")
    refuse(hf, "static_position_embeddings", "sinusoidal positions (Marian)")
    refuse(hf, "normalize_embedding", "BART without layernorm_embedding", allowed=(None, True))
    refuse(hf, "extra_pos_embeddings", f"a position offset other than {OFFSET}", allowed=(None, OFFSET))
    refuse(hf, "tie_word_embeddings", UNTIED, allowed=(True,))
    for decoder, encoder in TWINS.items():
        if hf[decoder] != hf[encoder]:
            raise ConfigError(decoder, hf[decoder], f"cannot be represented: our encoder and decoder share it, "
                              f"{encoder}={hf[encoder]}", [hf[encoder]])
    return [
        "topology=bart", "position=learned", "norm=layernorm",
        f"activation={activation(hf, 'activation_function', gated=False)}", "attention=mha", "ffn=dense",
        override("model.name", f"hf:{name}"), override("model.n_kv_heads", hf["encoder_attention_heads"]),
        *numbers(hf, NUMBERS), override("model.position_offset", OFFSET), override("model.norm_eps", EPS),
        "model.head_dim=null", "model.attention_scale=null", "model.attention_bias=true", "model.qkv_bias=true",
        "model.mlp_bias=true", "model.qk_norm=false",
        "model.tie_embeddings=true", "topology.scale_tied_head=false",
    ]


# Post-norm stacks with biases everywhere, LayerNorms of eps 1e-5, a norm on each stack's
# embeddings, position tables starting 2 rows in, the final_logits_bias buffer, one tied table.
EXPRESSES = Expresses(
    groups={"position": {"learned": {"max_positions": ANY, "offset": only(OFFSET)}},
            "norm": {"layernorm": {"eps": only(EPS), "bias": only(True)}}, "activation": PLAIN,
            "attention": {"gqa": {**MHA_BIASED["gqa"],
                                  "scale": where(lambda v, spec: v is None or v == spec.model.head_dim ** -0.5,
                                                 "null (1/sqrt(head_dim))")}},
            "ffn": dense(bias=only(True)),
            "topology": {"encoder_decoder": topology(norm_position=only("post"), embedding_norm=only(True),
                                                     head_bias=only("buffer"))}},
    model={"head_dim": SPLIT_HEADS, "tie_embeddings": only(True, why=f"an untied head: {UNTIED}"),
           "embedding_dim": only(None), "type_vocab_size": only(0)},
    stacks=("encoder", "decoder"))


# mBART: BART's declaration, pre-norm (each stack ending in its LayerNorm), the token
# embeddings scaled by sqrt(d_model) or not.
EXPRESSES_MBART = Expresses(
    groups={**EXPRESSES.groups,
            "topology": {"encoder_decoder": topology(norm_position=only("pre"), embedding_norm=only(True),
                                                     head_bias=only("buffer"), scale_embeddings=ANY)}},
    model=EXPRESSES.model, stacks=EXPRESSES.stacks)


# Marian: BART's declaration with fixed sinusoidal positions in halves, no norm on the embeddings,
# the token embeddings scaled by sqrt(d_model) or not.
EXPRESSES_MARIAN = Expresses(
    groups={**EXPRESSES.groups, "position": {"sinusoidal": {"base": only(10000.0), "layout": only("halves")}},
            "topology": {"encoder_decoder": topology(norm_position=only("post"), embedding_norm=only(False),
                                                     head_bias=only("buffer"), scale_embeddings=ANY)}},
    model=EXPRESSES.model, stacks=EXPRESSES.stacks)


def marian_config(spec: Any) -> dict[str, Any]:
    return {**hf_config(spec), "max_position_embeddings": spec.model.max_seq_len,
            "scale_embedding": spec.params["topology"].scale_embeddings, "decoder_vocab_size": spec.model.vocab_size,
            "share_encoder_decoder_embeddings": True}


def marian_tensors(spec: Any) -> list[TensorRule]:
    """BART's rules less the learned position tables and the norms on the embeddings."""
    return [r for r in tensors(spec) if "position.table" not in r.ours and "embed.norm." not in r.ours]


def mbart_config(spec: Any) -> dict[str, Any]:
    return {**hf_config(spec), "scale_embedding": spec.params["topology"].scale_embeddings}


def mbart_tensors(spec: Any) -> list[TensorRule]:
    """BART's rules and the LayerNorm that ends each stack."""
    return [*tensors(spec), *(TensorRule(f"{stack}.final_norm.{kind}", (prefix + f"layer_norm.{kind}",))
                              for stack, prefix in STACKS.items() for kind in ("weight", "bias"))]


def hf_config(spec: Any) -> dict[str, Any]:
    m, ffn = spec.model, spec.params["ffn"]
    return {
        "d_model": m.d_model, "encoder_layers": m.n_layers, "decoder_layers": m.n_layers,
        "encoder_attention_heads": m.n_heads, "decoder_attention_heads": m.n_heads,
        "encoder_ffn_dim": ffn.hidden, "decoder_ffn_dim": ffn.hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": getattr(spec.params["position"], "max_positions", m.max_seq_len),
        "activation_function": activation_back(spec, PLAIN_BACK),
        "scale_embedding": False, "tie_word_embeddings": m.tie_embeddings, "is_encoder_decoder": True,
    }


def tensors(spec: Any) -> list[TensorRule]:
    d = spec.model.d_model
    rules = [
        TensorRule("encoder_embed.tokens.weight", ("model.shared.weight",)),
        TensorRule("embed.tokens.weight", ("model.shared.weight",)),  # the same table, one more state-dict name
        # [1, vocab] on disk, our [vocab] buffer.
        TensorRule("head.bias", ("final_logits_bias",), "row"),
    ]
    for stack, prefix in STACKS.items():
        ours = "encoder_" if stack == "encoder" else ""
        block, layer = stack + ".blocks.{i}.", prefix + "layers.{i}."
        rules.append(TensorRule(ours + "position.table.weight", (prefix + "embed_positions.weight",)))
        pairs = [(ours + "embed.norm", prefix + "layernorm_embedding"),
                 (block + "attn_norm", layer + "self_attn_layer_norm"),
                 (block + "attn.out", layer + "self_attn.out_proj"),
                 (block + "ffn.up", layer + "fc1"), (block + "ffn.down", layer + "fc2"),
                 (block + "ffn_norm", layer + "final_layer_norm")]
        if stack == "decoder":
            pairs += [(block + "cross_norm", layer + "encoder_attn_layer_norm"),
                      (block + "cross_attn.q", layer + "encoder_attn.q_proj"),
                      (block + "cross_attn.out", layer + "encoder_attn.out_proj")]
        for kind in ("weight", "bias"):
            rules += [TensorRule(f"{a}.{kind}", (f"{b}.{kind}",)) for a, b in pairs]
            rules.append(TensorRule(block + f"attn.qkv.{kind}",
                                    tuple(layer + f"self_attn.{p}_proj.{kind}" for p in "qkv"), "cat", (d, d, d)))
            if stack == "decoder":
                rules.append(TensorRule(block + f"cross_attn.kv.{kind}",
                                        tuple(layer + f"encoder_attn.{p}_proj.{kind}" for p in "kv"), "cat", (d, d)))
    return rules


# Each stack's embed_tokens is `model.shared` itself in a tied BART (older checkpoints store
# the copies). lm_head.weight is deliberately not here: the mapping refuses one rather than
# drop a head that may differ (transformers itself unties when they differ).
IGNORE = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")

TYPES = (ModelType("bart", "BartForConditionalGeneration", bart_overrides, hf_config, tensors, IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS),
         ModelType("mbart", "MBartForConditionalGeneration", mbart_overrides, mbart_config, mbart_tensors, IGNORE,
                   expresses=EXPRESSES_MBART, defaults=DEFAULTS_MBART, extra_fields=MBART_FIELDS),
         ModelType("marian", "MarianMTModel", marian_overrides, marian_config, marian_tensors,
                   (*IGNORE, "model.encoder.embed_positions.weight", "model.decoder.embed_positions.weight"),
                   expresses=EXPRESSES_MARIAN, defaults=DEFAULTS_MARIAN))

guess = family_guess(TYPES)
