"""BERT (BertForMaskedLM), and the one mechanism every BERT-like encoder type shares:
`Encoder`, a table of where a checkpoint keeps each tensor and how its config spells
each number, made into a `ModelType` by `encoder_type`. RoBERTa, XLM-RoBERTa,
DistilBERT, ALBERT and ELECTRA are such tables (roberta.py, distilbert.py, albert.py,
electra.py); all of them are `topology=encoder_only`: a post-norm encoder with learned
positions, a LayerNorm on the embeddings, and the masked-LM head (dense, activation,
LayerNorm, the decoder tied to the token table unless untied, a vocabulary bias).

BERT's checkpoint layout: `bert.embeddings.{word,position,token_type}_embeddings`,
`bert.embeddings.LayerNorm`, `bert.encoder.layer.{i}.attention.self.{query,key,value}`
(fused into our qkv), `attention.output.dense` and `.LayerNorm` (our attn_norm:
post-norm), `intermediate.dense`, `output.dense` and `.LayerNorm` (our ffn_norm),
and the head `cls.predictions.transform.{dense,LayerNorm}` and `cls.predictions.bias`;
the decoder matrix is the word embeddings unless untied.

The pooler (`bert.pooler.dense`) and the next-sentence head (`cls.seq_relationship`)
of BertForPreTraining checkpoints (google-bert/bert-base-uncased included) are not
part of BertForMaskedLM and are ignored, as transformers does when it loads them into
BertForMaskedLM. With `topology.pooler=true` among from_hf's overrides, the pooler is
read into our `pooler` (and then required), and to_hf writes it back; so for every
type whose base model has a pooler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from ...errors import ConfigError
from ..fit import ANY, Allowed, Expresses, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, MHA_BIASED, PLAIN, PLAIN_BACK, SPLIT_HEADS, activation, activation_back, dense,
                     family_guess, refuse, topology, unused)

#: How BERT's config spells each number; a type spelling them otherwise (DistilBERT) has its own table.
#: A role a table leaves out is fixed by the type: no token types, LayerNorm eps 1e-12.
BERT_FIELDS = {
    "d_model": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
    "ffn_dim": "intermediate_size", "vocab_size": "vocab_size", "positions": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size", "norm_eps": "layer_norm_eps", "activation": "hidden_act",
    "tie_embeddings": "tie_word_embeddings",
}
FIXED_EPS = 1e-12  # the LayerNorm eps of a type whose config does not state one (DistilBERT)


@dataclass(frozen=True)
class Names:
    """Where a BERT-like checkpoint keeps each tensor. `layer` holds `{i}` (ALBERT: the
    layer group); the layer's parts are relative to it, Linear and LayerNorm names
    without `.weight`/`.bias`."""

    embeddings: str  # word_embeddings, position_embeddings, token_type_embeddings, LayerNorm under it
    layer: str
    qkv: tuple[str, str, str]
    attn_out: str
    attn_norm: str
    up: str
    down: str
    ffn_norm: str
    head_dense: str
    head_norm: str
    decoder: str  # the Linear that makes the logits: its weight when untied, and the bias its forward adds
    # A bias parameter beside the decoder: tied, the decoder's bias is this one; untied, transformers 5
    # keeps it unused (the forward adds the decoder's own), and to_hf writes our bias under both.
    head_bias: Optional[str] = None
    project: Optional[str] = None  # factorized embeddings projected to the model's width
    pooler: Optional[str] = None  # the base model's pooler, when it has one
    other_heads: tuple[str, ...] = ()  # heads of other classes (pre-training), ignored


#: The layer of BERT, RoBERTa and ELECTRA, relative to `Names.layer`.
BERT_LAYER = dict(qkv=("attention.self.query", "attention.self.key", "attention.self.value"),
                  attn_out="attention.output.dense", attn_norm="attention.output.LayerNorm",
                  up="intermediate.dense", down="output.dense", ffn_norm="output.LayerNorm")


@dataclass(frozen=True)
class Encoder:
    """One BERT-like model type, as data: `encoder_type` makes it a `ModelType`."""

    name: str  # model_type
    architecture: str  # its masked-LM class
    names: Names
    defaults: Mapping[str, Any]  # the config class's fields, every one, with its defaults
    fields: Mapping[str, str] = field(default_factory=lambda: BERT_FIELDS)
    extra_fields: Mapping[str, Any] = field(default_factory=dict)
    # "none": embeddings as wide as the model; "optional": `embedding_size` may differ (ELECTRA,
    # projected when it does); "required": always projected, so it must differ (ALBERT).
    factorized: str = "none"
    # The head's activation is exact GELU whatever the FFN's (RoBERTa, ELECTRA): ours applies one
    # activation in both, so the FFN's must be exact GELU too.
    gelu_head: bool = False
    # Positions count from pad_token_id + 1 (RoBERTa's create_position_ids_from_input_ids).
    positions_after_pad: bool = False
    shares_layers: bool = False  # layer groups (ALBERT): one block for all layers, or one per layer
    # The type's own fields: read (mapped, refused or marked unused) here; returns extra overrides.
    own: Callable[[Mapping[str, Any]], list[str]] = lambda hf: []
    own_back: Callable[[Any], dict[str, Any]] = lambda spec: {}  # the type's own fields, from our spec
    renames: tuple[tuple[str, str], ...] = ()


# ------------------------------------------------------------------ config both ways

def _offset(enc: Encoder, hf: Mapping[str, Any]) -> int:
    """Rows of the position table before position 0: RoBERTa's pad_token_id + 1, else none."""
    if not enc.positions_after_pad:
        return 0
    if hf.get("pad_token_id") is None:
        raise ConfigError("pad_token_id", None, f"cannot be represented: {enc.name} counts positions from "
                          "pad_token_id + 1", "a token id")
    return int(hf["pad_token_id"]) + 1


def _overrides(enc: Encoder, hf: Mapping[str, Any]) -> list[str]:
    f = enc.fields
    if "is_decoder" in enc.defaults:
        refuse(hf, "is_decoder", f"a causal {enc.name} (...ForCausalLM); encoder_only attends both ways")
        refuse(hf, "add_cross_attention", "cross-attention blocks in an encoder")
    if "position_embedding_type" in enc.extra_fields:  # transformers 5 reads none: only absolute computes as saved
        refuse(hf, "position_embedding_type", "relative position embeddings (only absolute ones map)",
               allowed=(None, "absolute"))
    if enc.gelu_head:
        refuse(hf, f["activation"], f"{enc.name}'s masked-LM head applies exact GELU whatever the FFN's "
               "activation; ours applies one activation in both", allowed=("gelu",))
    offset = _offset(enc, hf)
    positions = hf[f["positions"]] - offset
    if positions < 1:
        raise ConfigError(f["positions"], hf[f["positions"]], f"cannot be represented: {offset} rows of the "
                          "table come before position 0 (pad_token_id + 1)", f"an integer > {offset}")
    return [
        "position=learned", "norm=layernorm", f"activation={activation(hf, f['activation'], gated=False)}",
        "attention=mha", "ffn=dense", "topology=encoder_only", override("model.name", f"hf:{enc.name}"),
        override("model.d_model", hf[f["d_model"]]), override("model.n_layers", hf[f["n_layers"]]),
        override("model.n_heads", hf[f["n_heads"]]), override("model.n_kv_heads", hf[f["n_heads"]]),
        override("model.ffn_dim", hf[f["ffn_dim"]]), override("model.vocab_size", hf[f["vocab_size"]]),
        override("model.max_seq_len", positions), override("model.position_offset", offset),
        override("model.type_vocab_size", hf[f["type_vocab_size"]] if "type_vocab_size" in f else 0),
        override("model.norm_eps", float(hf[f["norm_eps"]]) if "norm_eps" in f else FIXED_EPS),
        override("model.tie_embeddings", bool(hf[f["tie_embeddings"]])),
        override("model.embedding_dim", _embedding_dim(enc, hf)),
        "model.attention_bias=true", "model.mlp_bias=true", *enc.own(hf),
    ]


def _embedding_dim(enc: Encoder, hf: Mapping[str, Any]) -> Optional[int]:
    if enc.factorized == "none":
        return None
    width, size = hf["hidden_size"], hf["embedding_size"]
    if enc.factorized == "required" and size == width:
        raise ConfigError("embedding_size", size, f"cannot be represented: {enc.name} projects its embeddings "
                          f"even when as wide as hidden_size; ours projects only other widths",
                          f"an integer other than {width}")
    return None if size == width else int(size)


def _hf_config(enc: Encoder, spec: Any) -> dict[str, Any]:
    f, m, position = enc.fields, spec.model, spec.params["position"]
    out = {f["d_model"]: m.d_model, f["n_layers"]: m.n_layers, f["n_heads"]: m.n_heads,
           f["ffn_dim"]: spec.params["ffn"].hidden, f["vocab_size"]: m.vocab_size,
           f["positions"]: position.max_positions + position.offset,
           f["activation"]: activation_back(spec, PLAIN_BACK), f["tie_embeddings"]: m.tie_embeddings}
    if "type_vocab_size" in f:
        out[f["type_vocab_size"]] = m.type_vocab_size
    if "norm_eps" in f:
        out[f["norm_eps"]] = spec.params["norm"].eps
    if enc.factorized != "none":
        out["embedding_size"] = m.embedding_width
    if "is_decoder" in enc.defaults:
        out.update(is_decoder=False, add_cross_attention=False)
    return {**out, **enc.own_back(spec)}


# ------------------------------------------------------------------ what the type expresses

def _pad_offset(value: int, spec: Any) -> bool:
    pad = spec.model.pad_token_id
    return pad is not None and value == pad + 1


def _expresses(enc: Encoder) -> Expresses:
    if enc.positions_after_pad:
        offset = where(_pad_offset, "model.pad_token_id + 1", why="positions other than RoBERTa's: the table's "
                       "rows before position 0 are pad_token_id + 1 (set model.pad_token_id)")
    else:
        offset = only(0, why="positions offset by some rows (RoBERTa is another model type)")
    eps = ANY if "norm_eps" in enc.fields else only(FIXED_EPS, why=f"a LayerNorm eps other than {enc.name}'s")
    activations = {"gelu": {"approximate": only("none", why="an activation other than the exact GELU its head "
                                                             "applies")}} if enc.gelu_head else PLAIN
    embedding: Allowed = {
        "none": only(None, why="factorized embeddings (ALBERT and ELECTRA are other model types)"),
        "optional": ANY,
        "required": where(lambda v, spec: v is not None and v != spec.model.d_model,
                          "an integer other than model.d_model",
                          why="embeddings as wide as the model (ALBERT always projects them)")}[enc.factorized]
    types = (where(lambda v, spec: v >= 1, "an integer >= 1", why=f"{enc.name} without token types")
             if "type_vocab_size" in enc.fields else only(0, why="token-type embeddings"))
    return Expresses(
        groups={"position": {"learned": {"max_positions": ANY, "offset": offset}},
                "norm": {"layernorm": {**LAYERNORM["layernorm"], "eps": eps}}, "activation": activations,
                "attention": MHA_BIASED, "ffn": dense(bias=only(True)),
                "topology": {"encoder_only": topology(
                    norm_position=only("post"), embedding_norm=only(True), mlm_transform=only(True),
                    head_bias=only("param"), share_layers=ANY if enc.shares_layers else only(False),
                    pooler=ANY if enc.names.pooler else only(False, why=f"a pooler ({enc.name} has none)"))}},
        model={"head_dim": SPLIT_HEADS, "tie_embeddings": ANY, "embedding_dim": embedding, "type_vocab_size": types},
        stacks=("encoder",))


# ------------------------------------------------------------------ tensors

BLOCK = "encoder.blocks.{i}."


def _pair(ours: str, theirs: str) -> list[TensorRule]:
    """A Linear or LayerNorm: weight and bias."""
    return [TensorRule(f"{ours}.{kind}", (f"{theirs}.{kind}",)) for kind in ("weight", "bias")]


def _tensors(enc: Encoder, spec: Any) -> list[TensorRule]:
    n, m = enc.names, spec.model
    layer = n.layer
    rules = [
        TensorRule("embed.tokens.weight", (n.embeddings + "word_embeddings.weight",)),
        TensorRule("position.table.weight", (n.embeddings + "position_embeddings.weight",)),
        *_pair("embed.norm", n.embeddings + "LayerNorm"),
        *_pair(BLOCK + "attn.out", layer + n.attn_out),
        *_pair(BLOCK + "attn_norm", layer + n.attn_norm),
        *_pair(BLOCK + "ffn.up", layer + n.up),
        *_pair(BLOCK + "ffn.down", layer + n.down),
        *_pair(BLOCK + "ffn_norm", layer + n.ffn_norm),
        *_pair("head.transform.0", n.head_dense),
        *_pair("head.transform.2", n.head_norm),
    ]
    if m.type_vocab_size:
        rules.append(TensorRule("embed.token_types.weight", (n.embeddings + "token_type_embeddings.weight",)))
    if m.embedding_width != m.d_model:
        rules += _pair("embed.project", n.project)
    for kind in ("weight", "bias"):
        rules.append(TensorRule(BLOCK + f"attn.qkv.{kind}", tuple(f"{layer}{p}.{kind}" for p in n.qkv), "cat",
                                (m.d_model,) * 3))
    if m.tie_embeddings:
        rules.append(TensorRule("head.bias", (n.head_bias or n.decoder + ".bias",)))
    else:
        rules += [TensorRule("head.weight", (n.decoder + ".weight",)),
                  TensorRule("head.bias", (n.decoder + ".bias", *((n.head_bias,) if n.head_bias else ())), "copies")]
    if getattr(spec.params["topology"], "pooler", False):
        rules += _pair("pooler", n.pooler)
    return rules


def _ignore(n: Names) -> tuple[str, ...]:
    """Tensors a checkpoint may hold that carry nothing of the model: `position_ids` and
    `token_type_ids`, buffers older transformers saved; tied, the decoder's copies of the
    word embeddings and of the bias; untied, the unused bias beside the decoder's; the
    pooler (unless asked for) and the heads of other classes."""
    copies = (n.decoder + ".weight", *((n.decoder + ".bias", n.head_bias) if n.head_bias else ()))
    return (n.embeddings + "position_ids", n.embeddings + "token_type_ids", *copies,
            *((n.pooler + ".",) if n.pooler else ()), *n.other_heads)


def encoder_type(enc: Encoder) -> ModelType:
    """The `ModelType` of a BERT-like encoder table."""
    if enc.shares_layers:  # `{i}` is ALBERT's layer group: one shared, or one per layer
        stacks = lambda spec: {"i": 1 if spec.params["topology"].share_layers else spec.model.n_layers}  # noqa: E731
    else:
        stacks = lambda spec: {"i": spec.model.n_layers}  # noqa: E731
    return ModelType(enc.name, enc.architecture, lambda hf: _overrides(enc, hf), lambda spec: _hf_config(enc, spec),
                     lambda spec: _tensors(enc, spec), _ignore(enc.names), stacks=stacks, renames=enc.renames,
                     expresses=_expresses(enc), defaults=enc.defaults, extra_fields=enc.extra_fields)


# ------------------------------------------------------------------ BERT

# BertConfig's fields and defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
            "layer_norm_eps": 1e-12, "tie_word_embeddings": True, "is_decoder": False, "add_cross_attention": False,
            "pad_token_id": 0, "bos_token_id": None,
            "eos_token_id": None}
#: Fields BERT-like configs saved by transformers before 5 carry: `position_embedding_type` (5 dropped
#: the relative kinds, so only "absolute" computes as saved), `output_past` (an older use_cache).
LEGACY = {"position_embedding_type": "absolute", "output_past": True}


def cache_flag(hf: Mapping[str, Any]) -> list[str]:
    """`output_past`: whether the key/value cache is returned; it never changes the logits."""
    unused(hf, "output_past")
    return []


BERT = Encoder(
    "bert", "BertForMaskedLM",
    Names(embeddings="bert.embeddings.", layer="bert.encoder.layer.{i}.", **BERT_LAYER,
          head_dense="cls.predictions.transform.dense", head_norm="cls.predictions.transform.LayerNorm",
          decoder="cls.predictions.decoder", head_bias="cls.predictions.bias", pooler="bert.pooler.dense",
          other_heads=("cls.seq_relationship.",)),
    DEFAULTS, extra_fields=LEGACY, own=cache_flag,
    # Google's original BERT checkpoints name LayerNorm tensors gamma and beta.
    renames=(("LayerNorm.gamma", "LayerNorm.weight"), ("LayerNorm.beta", "LayerNorm.bias")))

TYPES = (encoder_type(BERT),)

guess = family_guess(TYPES)
