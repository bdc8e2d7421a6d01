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

Refused: the mBART-style options older BART configs still carry (pre-norm
`normalize_before`, `add_final_layer_norm`), `scale_embedding` (token embeddings
times sqrt(d_model)), encoder and decoder that differ in depth, heads or width, and
`tie_word_embeddings: false` (transformers 5 then unties the token tables of the two
stacks as well: `model.encoder.embed_tokens` and `model.decoder.embed_tokens` are
tables of their own, `model.shared` goes unused; ours is one table).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..hf import ModelType, TensorRule, override
from .common import activation, ensure_fits, first_failed, numbers, refuse, wrong_plugin_or_topology

# BartConfig's defaults, for config.json files that leave a field out.
DEFAULTS = {"vocab_size": 50265, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
            "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
            "decoder_attention_heads": 16, "activation_function": "gelu", "d_model": 1024,
            "tie_word_embeddings": True}
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
# Our (activation plugin, GELU approximation) -> HF activation_function
ACTIVATIONS_BACK = {("gelu", "none"): "gelu", ("gelu", "tanh"): "gelu_new", ("relu", None): "relu",
                    ("silu", None): "silu"}
STACKS = {"encoder": "model.encoder.", "decoder": "model.decoder."}
# Why an untied BART is refused both ways: transformers 5 then unties every token table,
# so the encoder and the decoder each embed with their own (besides an unused `shared`).
UNTIED = ("transformers then gives each stack a token table of its own besides an unused model.shared; "
          "our stacks share one")
# Post-norm stacks, a norm on the embeddings and the final_logits_bias buffer.
TOPOLOGY = {"norm_position": "post", "parallel_residual": False, "residual": "standard", "share_layers": False,
            "embedding_norm": True, "mlm_transform": False, "head_bias": "buffer", "normalize_head": False}


def bart_overrides(hf: Mapping[str, Any]) -> list[str]:
    hf = {**DEFAULTS, **{k: v for k, v in hf.items() if v is not None}}
    refuse(hf, "scale_embedding", "token embeddings multiplied by sqrt(d_model)")
    refuse(hf, "normalize_before", "pre-norm layers (mBART)")
    refuse(hf, "add_final_layer_norm", "a final LayerNorm on each stack (mBART)")
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
        override("model.name", "hf:bart"), override("model.n_kv_heads", hf["encoder_attention_heads"]),
        *numbers(hf, NUMBERS), override("model.position_offset", OFFSET), override("model.norm_eps", EPS),
        "model.head_dim=null", "model.attention_scale=null", "model.attention_bias=true", "model.qkv_bias=true",
        "model.mlp_bias=true", "model.qk_norm=false",
        "model.tie_embeddings=true", "topology.scale_tied_head=false",
    ]


def _mismatch(spec: Any) -> Optional[tuple[str, Any, str]]:
    """The first part of `spec` BART cannot hold, as (key, value, why), or None."""
    m, p = spec.model, spec.params
    wanted = {"topology": "encoder_decoder", "position": "learned", "norm": "layernorm", "attention": "gqa",
              "ffn": "dense"}
    problem = wrong_plugin_or_topology(spec, "BART", wanted, TOPOLOGY)
    if problem:
        return problem
    attention, act, topology = p["attention"], p["activation"], p["topology"]
    checks = [
        ("model.layer_pattern", list(m.layer_pattern), not spec.layer_params, "BART has the same layer throughout"),
        ("model.tie_embeddings", m.tie_embeddings, m.tie_embeddings, f"in BART {UNTIED}"),
        ("topology.scale_tied_head", topology.scale_tied_head, not topology.scale_tied_head,
         "BART's head is not scaled"),
        ("activation", act.name, (act.plugin, getattr(act, "approximate", None)) in ACTIVATIONS_BACK,
         f"BART's activation_function is one of {sorted(ACTIVATIONS_BACK.values())}"),
        ("position.offset", p["position"].offset, p["position"].offset == OFFSET,
         f"BART's position tables start {OFFSET} rows in"),
        ("norm.bias", p["norm"].bias, p["norm"].bias, "BART's LayerNorms have a bias"),
        ("norm.eps", p["norm"].eps, p["norm"].eps == EPS, f"BART's LayerNorms have eps={EPS}"),
        ("attention.num_kv_heads", attention.num_kv_heads, attention.num_kv_heads == m.n_heads,
         "BART has multi-head attention"),
        ("attention.qkv_bias", attention.qkv_bias, attention.qkv_bias, "BART biases every projection"),
        ("attention.out_bias", attention.out_bias, attention.out_bias, "BART biases every projection"),
        ("attention.window", attention.window, attention.window is None, "BART attends to every allowed token"),
        ("attention.qk_norm", attention.qk_norm, not attention.qk_norm, "BART has no QK-norm"),
        ("attention.scale", attention.scale, attention.scale in (None, m.head_dim ** -0.5),
         "BART scales scores by 1/sqrt(head_dim)"),
        ("model.head_dim", m.head_dim, m.head_dim * m.n_heads == m.d_model, "BART has head_dim = d_model / n_heads"),
        ("ffn.bias", p["ffn"].bias, p["ffn"].bias, "BART biases the FFN"),
        ("model.type_vocab_size", m.type_vocab_size, m.type_vocab_size == 0, "BART has no token types"),
        ("model.embedding_dim", m.embedding_dim, m.embedding_width == m.d_model, "BART has no factorized embeddings"),
    ]
    return first_failed(checks)


def hf_config(spec: Any) -> dict[str, Any]:
    ensure_fits(_mismatch(spec), "bart")
    m, act = spec.model, spec.params["activation"]
    return {
        "d_model": m.d_model, "encoder_layers": m.n_layers, "decoder_layers": m.n_layers,
        "encoder_attention_heads": m.n_heads, "decoder_attention_heads": m.n_heads,
        "encoder_ffn_dim": m.ffn_dim, "decoder_ffn_dim": m.ffn_dim, "vocab_size": m.vocab_size,
        "max_position_embeddings": spec.params["position"].max_positions,
        "activation_function": ACTIVATIONS_BACK[act.plugin, getattr(act, "approximate", None)],
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

TYPES = (ModelType("bart", "BartForConditionalGeneration", bart_overrides, hf_config, tensors, IGNORE),)


def guess(spec: Any) -> str | None:
    return "bart" if _mismatch(spec) is None else None
