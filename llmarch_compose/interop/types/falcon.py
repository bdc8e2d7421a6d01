"""Falcon (FalconForCausalLM: Falcon-7B, -40B, -180B, Falcon-RW): LayerNorm blocks, RoPE
on the whole of each head, one `bias` flag for every projection of attention and MLP,
a plain MLP of `ffn_hidden_size` (4 x hidden_size when left out), a head without bias,
tied by default. Three block layouts:

- `parallel_attn` (Falcon-7B): attention and MLP side by side off one shared LayerNorm,
  x + attn(ln(x)) + mlp(ln(x)): our `topology.shared_norm`;
- `new_decoder_architecture` (Falcon-40B, -180B): the same with a LayerNorm of its own
  per branch (`ln_attn`, `ln_mlp`: our two-norm parallel residual), or one shared norm
  when `num_ln_in_parallel_attn` is 1, and grouped key/value heads (`num_kv_heads`);
- neither (Falcon-RW): the sequential pre-norm block.

Outside the new architecture, `multi_query` gives one key/value head, else every head
has its own. The checkpoint layout: `transformer.word_embeddings`, `transformer.h.{i}.`
`input_layernorm` (or `ln_attn` and `ln_mlp`; sequential: `input_layernorm` and
`post_attention_layernorm`), `self_attention.query_key_value` (rows group by group:
each key/value group's query heads, its key head, its value head; our `groups` join),
`self_attention.dense`, `mlp.dense_h_to_4h`, `mlp.dense_4h_to_h`, `transformer.ln_f`,
`lm_head` (only when untied).

Refused: `alibi` (Falcon's ALiBi path), a `new_decoder_architecture` without
`parallel_attn` (transformers' Falcon cannot run it), `num_ln_in_parallel_attn` outside
the new architecture, and `num_kv_heads` other than `num_attention_heads` where the
layout gives every head its own key and value. Falcon's rotary embedding ignores a
stated `partial_rotary_factor`: every dimension rotates.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule
from ..mapping import ModelType, TensorRule, override
from .common import (LAYERNORM, PLAIN, PLAIN_BACK, PLAIN_MODEL, SAME_BIAS, SPLIT_HEADS, activation,
                     activation_back, dense, family_guess, gqa, numbers, refuse, rope, rope_back, rope_position,
                     topology, unused)

# FalconConfig's defaults, for config.json files that leave a field out; num_kv_heads (the
# attention heads) and ffn_hidden_size (4 x hidden_size) are derived when left out.
DEFAULTS = {"vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
            "num_ln_in_parallel_attn": None, "layer_norm_epsilon": 1e-5, "num_kv_heads": None, "alibi": False,
            "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "bias": False,
            "max_position_embeddings": 2048, "rope_parameters": None, "bos_token_id": 11, "eos_token_id": 11,
            "pad_token_id": None, "ffn_hidden_size": None, "activation": "gelu", "tie_word_embeddings": True}
# Falcon-7B's config.json (written by the first transformers release with Falcon) also states
# this field of the checkpoint's original code (false: the pre-norm block); FalconConfig
# writes num_key_value_heads, which it derives from the layout again when it reads a file.
EXTRA_FIELDS = {"apply_residual_connection_post_layernorm": False, "num_key_value_heads": None}
NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "vocab_size": "model.vocab_size", "max_position_embeddings": "model.max_seq_len",
    "layer_norm_epsilon": "model.norm_eps", "bias": "model.attention_bias",
}
LAYER = "transformer.h.{i}."
BLOCK = "decoder.blocks.{i}."


def falcon_overrides(hf: Mapping[str, Any]) -> list[str]:
    refuse(hf, "alibi", "Falcon's ALiBi scores are not mapped")
    refuse(hf, "apply_residual_connection_post_layernorm", "a residual taken after the norm")
    heads, new = hf["num_attention_heads"], bool(hf["new_decoder_architecture"])
    parallel = bool(hf["parallel_attn"])
    stated_kv = hf["num_kv_heads"]
    if new:
        if not parallel:
            raise ConfigError("parallel_attn", False, "cannot be represented: transformers' Falcon runs the new "
                              "decoder architecture only with parallel attention", [True])
        n_ln = hf["num_ln_in_parallel_attn"] or 2
        if n_ln not in (1, 2):
            raise ConfigError("num_ln_in_parallel_attn", n_ln, "cannot be represented: one or two norms per "
                              "block", [None, 1, 2])
        kv, shared = stated_kv or heads, n_ln == 1
    else:
        refuse(hf, "num_ln_in_parallel_attn", "read by the new decoder architecture only", allowed=(None, 1))
        multi = bool(hf["multi_query"])
        if not multi and stated_kv not in (None, heads):
            raise ConfigError("num_kv_heads", stated_kv, "cannot be represented: this layout fuses a key and a "
                              "value for every head, but transformers' Falcon would group them by num_kv_heads",
                              [None, heads])
        unused(hf, "num_kv_heads")  # multi_query: one key/value head whatever it says
        kv, shared = (1 if multi else heads), parallel
    if new:
        unused(hf, "multi_query")  # the new architecture's grouping is num_kv_heads
    unused(hf, "num_key_value_heads")  # derived from the layout, as above
    unused(hf, "partial_rotary_factor")  # Falcon's rotary embedding rotates every dimension
    params = {k: v for k, v in dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {}).items()
              if k != "partial_rotary_factor"}
    params.setdefault("rope_theta", hf.get("rope_theta") or 10000.0)
    stated = {"rope_parameters": params, "max_position_embeddings": hf["max_position_embeddings"]}
    return [
        "position=rope", "norm=layernorm", f"activation={activation(hf, 'activation', gated=False)}",
        "attention=gqa", "ffn=dense", "topology=decoder_only", override("model.name", "hf:falcon"),
        override("model.n_kv_heads", kv), override("model.mlp_bias", bool(hf["bias"])),
        override("model.ffn_dim", hf["ffn_hidden_size"] or 4 * hf["hidden_size"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("topology.parallel_residual", new or parallel), override("topology.shared_norm", shared),
        *numbers(hf, NUMBERS), *rope(stated),
    ]


def _old_layout(spec: Any) -> bool:
    """Whether multi_query (one key/value head) or multi-head attention says the key/value heads."""
    return spec.params["attention"].num_kv_heads in (1, spec.model.n_heads)


# The sequential block exists only outside the new architecture: multi-query or multi-head.
SEQUENTIAL_HEADS = Rule("attention.num_kv_heads", lambda spec: spec.params["attention"].num_kv_heads,
                        lambda spec: spec.params["topology"].parallel_residual or _old_layout(spec),
                        "1 or model.n_heads (or a parallel residual)",
                        "grouped key/value heads in a sequential block")
# Guessed for the parallel blocks only: a sequential Falcon is StarCoder2's block, written as that.
ONLY_PARALLEL = Rule("topology.parallel_residual", lambda spec: spec.params["topology"].parallel_residual,
                     lambda spec: spec.params["topology"].parallel_residual, [True],
                     "a sequential block (written as Falcon only when asked for)")

EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": LAYERNORM, "activation": PLAIN, "attention": gqa(),
            "ffn": dense(bias=SAME_BIAS),
            "topology": {"decoder_only": topology(parallel_residual=ANY, shared_norm=ANY)}},
    model={**PLAIN_MODEL, "head_dim": SPLIT_HEADS}, rules=(SEQUENTIAL_HEADS,), guess_rules=(ONLY_PARALLEL,))


def _layout(spec: Any) -> dict[str, Any]:
    """new_decoder_architecture, parallel_attn, multi_query and the norm count of our spec."""
    t, kv = spec.params["topology"], spec.params["attention"].num_kv_heads
    if not t.parallel_residual:
        return {"new_decoder_architecture": False, "parallel_attn": False, "multi_query": kv == 1}
    if t.shared_norm and _old_layout(spec):  # Falcon-7B's block
        return {"new_decoder_architecture": False, "parallel_attn": True, "multi_query": kv == 1}
    return {"new_decoder_architecture": True, "parallel_attn": True, "num_kv_heads": kv,
            "num_ln_in_parallel_attn": 1 if t.shared_norm else 2}


def hf_config(spec: Any) -> dict[str, Any]:
    m = spec.model
    written = rope_back(spec)
    out = {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "ffn_hidden_size": spec.params["ffn"].hidden, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "layer_norm_epsilon": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "activation": activation_back(spec, PLAIN_BACK),
        "bias": spec.params["attention"].out_bias, "alibi": False, "rope_parameters": written["rope_parameters"],
        **_layout(spec),
    }
    if "max_position_embeddings" in written:  # dynamic NTK scales past it
        out["max_position_embeddings"] = written["max_position_embeddings"]
    return out


def tensors(spec: Any) -> list[TensorRule]:
    m, kv = spec.model, spec.params["attention"].num_kv_heads
    t = spec.params["topology"]
    if not t.parallel_residual:
        norms = [("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")]
    elif t.shared_norm:
        norms = [("attn_norm", "input_layernorm")]
    else:
        norms = [("attn_norm", "ln_attn"), ("ffn_norm", "ln_mlp")]
    rules = [TensorRule("embed.tokens.weight", ("transformer.word_embeddings.weight",))]
    for kind in ("weight", "bias"):
        rules += [TensorRule(BLOCK + f"{ours}.{kind}", (LAYER + f"{theirs}.{kind}",)) for ours, theirs in norms]
        rules.append(TensorRule(f"decoder.final_norm.{kind}", (f"transformer.ln_f.{kind}",)))
    for kind in ("weight", "bias") if spec.params["attention"].out_bias else ("weight",):
        rules += [TensorRule(BLOCK + f"attn.qkv.{kind}", (LAYER + f"self_attention.query_key_value.{kind}",),
                             "groups", (kv, m.n_heads // kv, m.head_dim)),
                  TensorRule(BLOCK + f"attn.out.{kind}", (LAYER + f"self_attention.dense.{kind}",)),
                  TensorRule(BLOCK + f"ffn.up.{kind}", (LAYER + f"mlp.dense_h_to_4h.{kind}",)),
                  TensorRule(BLOCK + f"ffn.down.{kind}", (LAYER + f"mlp.dense_4h_to_h.{kind}",))]
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    return rules


# A tied checkpoint may still store the head (a copy); older ones the rotary frequencies.
IGNORE = ("rotary_emb.inv_freq", "lm_head.weight")

TYPES = (ModelType("falcon", "FalconForCausalLM", falcon_overrides, hf_config, tensors, IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
