"""ModernBERT (ModernBertForMaskedLM): a pre-norm encoder with RoPE and local/global layers.

What it computes, in our terms: `topology=encoder_only` with `norm_position=pre`, a LayerNorm
on the embeddings and a final one, and no norm before the first layer's attention (its input,
the embeddings, is already normalized: `topology.first_attn_norm=false`); LayerNorms without
bias (`norm_bias`), no biases on the projections (`attention_bias`, `mlp_bias`); GeGLU with one
fused `Wi` (the activated half first, our `ffn.up` as is); multi-head attention with a fused
`Wqkv`. Every `global_attn_every_n_layers`-th layer (from the first) attends to the whole
sequence with RoPE base `global_rope_theta` (160K); the others are local: a token sees those
at most `local_attention // 2` (64) positions away on either side, a symmetric window that our
bidirectional window of `local_attention // 2 + 1` (keys fewer than that many positions away)
is, with RoPE base `local_rope_theta` (10K): a `model.layer_pattern` rule gives the global
layers their window and position params. The MLM head is dense (bias `classifier_bias`),
activation (`classifier_activation`, which must be the model's), LayerNorm, and the decoder
tied to the token table with a vocabulary bias (`decoder_bias`).

Checkpoint layout: `model.embeddings.{tok_embeddings,norm}`, `model.layers.{i}.attn_norm`
(none in layer 0), `attn.Wqkv`, `attn.Wo`, `mlp_norm`, `mlp.Wi`, `mlp.Wo`, `model.final_norm`,
`head.dense`, `head.norm`, `decoder.bias` (and `decoder.weight`, the tied table).
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ModelType, TensorRule, override
from .common import (GATED, GATED_BACK, LAYER_KINDS, activation, activation_back, family_guess, gqa,
                     rope_back, rope_by_layer_position, rope_by_layer_type, topology, unused)

# ModernBertConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
            "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192,
            "norm_eps": 1e-5, "norm_bias": False, "pad_token_id": 50283, "eos_token_id": 50282,
            "bos_token_id": 50281, "cls_token_id": 50281, "sep_token_id": 50282, "attention_bias": False,
            "layer_types": None, "rope_parameters": None, "local_attention": 128, "mlp_bias": False,
            "decoder_bias": True, "classifier_pooling": "cls", "classifier_bias": False,
            "classifier_activation": "gelu", "deterministic_flash_attn": False, "sparse_prediction": False,
            "sparse_pred_ignore_index": -100, "tie_word_embeddings": True}
# The released configs' older spellings: each layer type's RoPE base, the period of the global
# layers; and what only the library's compile path read.
EXTRA_FIELDS = {"global_rope_theta": None, "local_rope_theta": None, "global_attn_every_n_layers": None,
                "reference_compile": None, "repad_logits_with_grad": None}
THETA = {"full_attention": 160_000.0, "sliding_attention": 10_000.0}  # ModernBertConfig.default_theta
LEGACY = {"full_attention": "global_rope_theta", "sliding_attention": "local_rope_theta"}
EVERY = 3  # global_attn_every_n_layers when the config leaves it out

NUMBERS = {"hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers",
           "num_attention_heads": "model.n_heads", "intermediate_size": "model.ffn_dim",
           "vocab_size": "model.vocab_size", "max_position_embeddings": "model.max_seq_len",
           "norm_eps": "model.norm_eps"}


def layer_types(hf: Mapping[str, Any]) -> list[str]:
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None:
        every = hf.get("global_attn_every_n_layers") or EVERY
        return ["sliding_attention" if i % every else "full_attention" for i in range(n)]
    if len(types) != n or any(t not in LAYER_KINDS for t in types):
        raise ConfigError("layer_types", types, f"cannot be represented: one of {list(LAYER_KINDS)} per layer "
                          f"({n} layers)", [f"{n} of {list(LAYER_KINDS)}"])
    return list(types)


def overrides(hf: Mapping[str, Any]) -> list[str]:
    # Only how the library trains or runs (sparse MLM loss, flash kernels, compile), its other heads,
    # and the tokenizer's ids.
    unused(hf, "sparse_prediction", "sparse_pred_ignore_index", "deterministic_flash_attn", "reference_compile",
           "repad_logits_with_grad", "classifier_pooling", "cls_token_id", "sep_token_id")
    act = activation(hf, "hidden_activation", gated=True)
    if hf["classifier_activation"] != hf["hidden_activation"]:
        raise ConfigError("classifier_activation", hf["classifier_activation"], "cannot be represented: our MLM "
                          "head applies the model's activation", [hf["hidden_activation"]])
    if hf["num_attention_heads"] and hf["hidden_size"] % hf["num_attention_heads"]:
        raise ConfigError("num_attention_heads", hf["num_attention_heads"], "hidden_size must be a multiple of it",
                          "a divisor of hidden_size")
    types = layer_types(hf)
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(types) if t == "full_attention"]
    local = hf["local_attention"]
    if sliding and (local is None or local < 0):
        raise ConfigError("local_attention", local, f"cannot be represented: layers {sliding} are local "
                          "attention without a window", ["an even number of tokens >= 2"])
    ropes = rope_by_layer_type(hf, LEGACY, THETA, scaled=LAYER_KINDS)
    wide = "sliding_attention" if sliding else "full_attention"
    theta, scaling = ropes[wide]
    out = ["position=rope", "norm=layernorm", f"activation={act}", "ffn=dense", "topology=encoder_only",
           override("model.name", "hf:modernbert"), *(override(ours, hf[theirs]) for theirs, ours in NUMBERS.items()),
           override("model.n_kv_heads", hf["num_attention_heads"]),
           override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
           override("model.attention_bias", bool(hf["attention_bias"])),
           override("model.mlp_bias", bool(hf["mlp_bias"])),
           override("norm.bias", bool(hf["norm_bias"])),
           override("model.rope_theta", theta), override("model.rotary_fraction", 1.0),
           "topology.norm_position=pre", "topology.embedding_norm=true", "topology.mlm_transform=true",
           override("topology.mlm_transform_bias", bool(hf["classifier_bias"])),
           override("topology.head_bias", "param" if hf["decoder_bias"] else "none"),
           "topology.first_attn_norm=false"]
    if scaling is not None:
        out.append(override("model.rope_scaling", scaling))
    # |query - key| <= local_attention // 2: fewer than local_attention // 2 + 1 positions away.
    out += ["attention=swa", override("model.window", local // 2 + 1)] if sliding else ["attention=gqa"]
    if sliding and full:
        theta, scaling = ropes["full_attention"]
        out.append(override("model.layer_pattern", [{"layers": full, "attention": {"window": None},
                                                     "position": {"theta": theta, "scaling": scaling}}]))
    return out


def windows(spec: Any) -> list:
    return [spec.params_for("attention", i, "encoder").window for i in range(spec.model.n_layers)]


def _rope_by_kind(spec: Any) -> dict[str, list]:
    out: dict[str, list] = {kind: [] for kind in LAYER_KINDS}
    for i, w in enumerate(windows(spec)):
        p = spec.params_for("position", i, "encoder")
        kind = out["full_attention" if w is None else "sliding_attention"]
        if p not in kind:
            kind.append(p)
    return out


def hf_config(spec: Any) -> dict[str, Any]:
    m, topo = spec.model, spec.params["topology"]
    per_layer = windows(spec)
    sliding = sorted({w for w in per_layer if w is not None})
    ropes = {kind: rope_back(spec, params[0] if params else spec.params["position"])["rope_parameters"]
             for kind, params in _rope_by_kind(spec).items()}
    act = activation_back(spec, GATED_BACK)
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "intermediate_size": spec.params["ffn"].hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "norm_eps": spec.params["norm"].eps,
        "norm_bias": spec.params["norm"].bias, "attention_bias": spec.params["attention"].qkv_bias,
        "mlp_bias": spec.params["ffn"].bias, "hidden_activation": act, "classifier_activation": act,
        "classifier_bias": topo.mlm_transform_bias, "decoder_bias": topo.head_bias == "param",
        "tie_word_embeddings": m.tie_embeddings,
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in per_layer],
        "local_attention": 2 * (sliding[0] - 1) if sliding else DEFAULTS["local_attention"],
        "rope_parameters": ropes,
    }


LAYER, BLOCK = "model.layers.{i}.", "encoder.blocks.{i}."


def tensors(spec: Any) -> list[TensorRule]:
    bias = spec.params["norm"].bias
    norm_parts = ("weight", "bias") if bias else ("weight",)
    rules = [TensorRule("embed.tokens.weight", ("model.embeddings.tok_embeddings.weight",))]
    rules += [TensorRule(f"embed.norm.{k}", (f"model.embeddings.norm.{k}",)) for k in norm_parts]
    rules += [TensorRule(f"encoder.final_norm.{k}", (f"model.final_norm.{k}",)) for k in norm_parts]
    rules += [TensorRule(f"head.transform.2.{k}", (f"head.norm.{k}",)) for k in norm_parts]
    rules.append(TensorRule("head.transform.0.weight", ("head.dense.weight",)))
    if spec.params["topology"].mlm_transform_bias:
        rules.append(TensorRule("head.transform.0.bias", ("head.dense.bias",)))
    if spec.params["topology"].head_bias == "param":
        rules.append(TensorRule("head.bias", ("decoder.bias",)))
    if not spec.model.tie_embeddings:
        rules.append(TensorRule("head.weight", ("decoder.weight",)))
    attn = ("weight", "bias") if spec.params["attention"].qkv_bias else ("weight",)
    mlp = ("weight", "bias") if spec.params["ffn"].bias else ("weight",)
    rules += [TensorRule(BLOCK + f"attn.qkv.{k}", (LAYER + f"attn.Wqkv.{k}",)) for k in attn]
    rules += [TensorRule(BLOCK + f"attn.out.{k}", (LAYER + f"attn.Wo.{k}",)) for k in attn]
    rules += [TensorRule(BLOCK + f"ffn.up.{k}", (LAYER + f"mlp.Wi.{k}",)) for k in mlp]
    rules += [TensorRule(BLOCK + f"ffn.down.{k}", (LAYER + f"mlp.Wo.{k}",)) for k in mlp]
    rules += [TensorRule(BLOCK + f"ffn_norm.{k}", (LAYER + f"mlp_norm.{k}",)) for k in norm_parts]
    # Layer 0 has no attention norm, on either side.
    rules += [TensorRule(f"encoder.blocks.{i}.attn_norm.{k}", (f"model.layers.{i}.attn_norm.{k}",))
              for i in range(1, spec.model.n_layers) for k in norm_parts]
    return rules


# A tied checkpoint stores the decoder matrix too (a copy of the token table).
IGNORE = ("decoder.weight",)

SAME_BIAS = where(lambda v, spec: v == spec.params["attention"].out_bias, "attention.out_bias",
                  "biases on q, k and v but not on the output (or the reverse)")
MHA = where(lambda v, spec: v == spec.model.n_heads, "model.n_heads", "grouped key/value heads")
SPLIT = where(lambda v, spec: v * spec.model.n_heads == spec.model.d_model, "model.d_model / model.n_heads",
              "a head_dim other than d_model / n_heads")


def _same(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["attention"], field), f"attention.{field}",
                 f"an attention {field.replace('_', ' ')} that differs from layer to layer")


def _same_position(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["position"], field), f"position.{field}",
                 f"a position {field} that differs from layer to layer")


EXPRESSES = Expresses(
    groups={"position": rope_by_layer_position(), "norm": {"layernorm": {"eps": ANY, "bias": ANY}},
            "activation": GATED, "attention": gqa(num_kv_heads=MHA, qkv_bias=SAME_BIAS, window=ANY),
            "ffn": {"dense": {"hidden": ANY, "bias": ANY}},
            "topology": {"encoder_only": topology(
                norm_position=only("pre"), embedding_norm=only(True), mlm_transform=only(True),
                mlm_transform_bias=ANY, head_bias=only("param", "none"), first_attn_norm=only(False),
                pooler=only(False))}},
    model={"head_dim": SPLIT, "tie_embeddings": ANY, "embedding_dim": only(None), "type_vocab_size": only(0)},
    stacks=("encoder",),
    layers={"attention": {"gqa": {**{f: _same(f) for f in ("num_kv_heads", "qkv_bias", "out_bias", "scale",
                                                           "qk_norm", "softcap")}, "window": ANY}},
            "position": rope_by_layer_position(fraction=_same_position("fraction"),
                                      interleaved=_same_position("interleaved"))},
    rules=(Rule("model.layer_pattern", lambda spec: sorted({w for w in windows(spec) if w is not None}),
                lambda spec: len({w for w in windows(spec) if w is not None}) <= 1, "one window size",
                "windows of several sizes (ModernBERT has one local_attention)"),
           Rule("model.layer_pattern", lambda spec: list(spec.model.layer_pattern),
                lambda spec: all(len(p) <= 1 for p in _rope_by_kind(spec).values()),
                "one RoPE for the local layers and one for the global ones",
                "RoPE that differs between layers of one type (ModernBERT has one per layer type)")))

TYPES = (ModelType("modernbert", "ModernBertForMaskedLM", overrides, hf_config, tensors, IGNORE,
                   stacks=lambda spec: {"i": spec.model.n_layers}, expresses=EXPRESSES, defaults=DEFAULTS,
                   extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
