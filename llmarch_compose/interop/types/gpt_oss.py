"""gpt-oss (GptOssForCausalLM; openai/gpt-oss-20b, -120b).

A LLaMA-shaped decoder (pre-norm RMSNorm, untied head, GQA with RoPE) with:

- attention sinks: a learned logit per query head joins each softmax and attends to no
  value (`self_attn.sinks`, our `attention.sinks`); biases on q, k, v and o
  (`attention_bias`);
- sliding and full attention layers (`layer_types`, by default every other layer sliding
  from the first, with one `sliding_window`): a `model.layer_pattern` window;
- experts in every layer: a biased router (`mlp.router.weight|bias`) whose softmax over the
  top-k logits is our renormalized top-k of the softmax (ffn=gpt_oss_moe), and experts
  stored fused and transposed (`mlp.experts.gate_up_proj` [experts, hidden, 2 x width]
  with gate and up alternating element by element, `gate_up_proj_bias`, `down_proj`
  [experts, width, hidden], `down_proj_bias`), activated by the clamped SwiGLU
  (`swiglu_alpha`, `swiglu_limit`: activation=swiglu_clamped);
- YaRN RoPE whose ramp ends are not rounded (`truncate: false`), GptOssConfig's default
  when a config states no rope parameters.

The released checkpoints store the experts quantized (MXFP4, `quantization_config`):
refused like every quantized checkpoint; a dequantized copy reads.
"""

from __future__ import annotations

from typing import Any, Mapping

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ModelType, TensorRule, override
from . import gemma, llama
from .common import PLAIN_MODEL, RMSNORM, TOPOLOGY, family_guess, gqa, moe, numbers, rope, rope_back, \
    rope_position, unused

LAYER, BLOCK = llama.LAYER, llama.BLOCK

#: GptOssConfig's RoPE when a config states none.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096}

DEFAULT_THETA = 150000.0

# GptOssConfig()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
            "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
            "sliding_window": 128, "tie_word_embeddings": False, "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_parameters": None,
            "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
            "router_aux_loss_coef": 0.001, "layer_types": None, "pad_token_id": None, "bos_token_id": None,
            "eos_token_id": None, "attention_bias": True}
#: Fields of the released config.json that GptOssConfig does not define: the original
#: implementation's names for the pre-training context and the experts per token.
EXTRA_FIELDS = {"initial_context_length": None, "experts_per_token": None}

NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "num_key_value_heads": "model.n_kv_heads", "head_dim": "model.head_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "rms_norm_eps": "model.norm_eps",
    "num_local_experts": "model.n_experts", "num_experts_per_tok": "model.experts_per_token",
    "intermediate_size": "model.expert_ffn_dim", "router_aux_loss_coef": "model.router_aux_loss_coef",
}


def overrides(hf: Mapping[str, Any]) -> list[str]:
    # hidden_act: GptOssConfig carries it, its experts never read it (the clamped SwiGLU is fixed).
    unused(hf, "hidden_act")
    # initial_context_length: the original implementation's name for the YaRN pre-training context,
    # which transformers reads from the rope parameters alone.
    unused(hf, "initial_context_length")
    stated = hf.get("experts_per_token")
    if stated is not None and stated != hf["num_experts_per_tok"]:
        raise ConfigError("experts_per_token", stated, "cannot be represented: transformers reads "
                          f"num_experts_per_tok ({hf['num_experts_per_tok']}), so the two must agree",
                          [None, hf["num_experts_per_tok"]])
    stated = (hf.get("rope_parameters") or {}).get("rope_theta")
    if stated is not None and hf.get("rope_theta") not in (None, stated):
        raise ConfigError("rope_theta", hf["rope_theta"], "cannot be represented: transformers reads "
                          f"rope_parameters.rope_theta ({stated}), so the two must agree", [None, stated])
    if hf.get("rope_parameters") is None and hf.get("rope_scaling") is None:
        hf["rope_parameters"] = dict(DEFAULT_ROPE)  # what GptOssConfig sets
    if stated is None and hf.get("rope_theta") is None:
        hf["rope_theta"] = DEFAULT_THETA  # GptOssConfig's base, not RoPE's usual 10000
    types = gemma.layer_types(hf)
    window = hf["sliding_window"]
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if sliding and not window:
        raise ConfigError("sliding_window", window, f"cannot be represented: layers {sliding} are sliding "
                          "attention without a window", ["a number of tokens >= 1"])
    bias = bool(hf["attention_bias"])
    out = [
        "position=rope", "norm=rmsnorm", "activation=swiglu_clamped", "topology=decoder_only",
        "attention=gqa", "attention.sinks=true", "ffn=gpt_oss_moe", override("model.name", "hf:gpt_oss"),
        *numbers(hf, NUMBERS), *rope(hf), "model.n_shared_experts=0",
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("model.attention_bias", bias), override("model.qkv_bias", bias),
        override("activation.alpha", float(hf["swiglu_alpha"])),
        override("activation.limit", float(hf["swiglu_limit"])),
    ]
    if len(sliding) == len(types):  # every layer windowed: the model-wide window
        out.append(override("attention.window", window))
    elif sliding:
        out.append(override("model.layer_pattern", [{"layers": sliding, "attention": {"window": window}}]))
    return out


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention, ffn, act = spec.model, spec.params["attention"], spec.params["ffn"], spec.params["activation"]
    per_layer = gemma.windows(spec)
    sliding = sorted({w for w in per_layer if w is not None})
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": attention.num_kv_heads, "head_dim": m.head_dim, "intermediate_size": ffn.hidden,
        "num_local_experts": ffn.num_experts, "num_experts_per_tok": ffn.top_k, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": attention.out_bias,
        # GptOssModel builds the sliding mask whether a layer uses it or not: with none, the default.
        "sliding_window": sliding[0] if sliding else DEFAULTS["sliding_window"],
        "layer_types": ["full_attention" if w is None else "sliding_attention" for w in per_layer],
        "swiglu_alpha": act.alpha, "swiglu_limit": act.limit, "router_aux_loss_coef": ffn.aux_loss_coef,
        **rope_back(spec),
    }


def tensors(spec: Any) -> list[TensorRule]:
    """LLaMA's attention, norm and embedding rules, the sinks, and the fused biased experts."""
    width = spec.params["ffn"].hidden
    ours, theirs = BLOCK + "ffn.", LAYER + "mlp."
    rules = [r for r in llama.tensors(spec) if ".ffn." not in r.ours]
    return [*rules, TensorRule(BLOCK + "attn.sinks", (LAYER + "self_attn.sinks",)),
            TensorRule(ours + "router.weight", (theirs + "router.weight",)),
            TensorRule(ours + "router.bias", (theirs + "router.bias",)),
            TensorRule(ours + "w_in", (theirs + "experts.gate_up_proj",), "alternate", (width, width)),
            TensorRule(ours + "in_bias", (theirs + "experts.gate_up_proj_bias",), "alternate", (width, width)),
            TensorRule(ours + "w_out", (theirs + "experts.down_proj",)),
            TensorRule(ours + "out_bias", (theirs + "experts.down_proj_bias",))]


def _same(field: str) -> Any:
    return where(lambda v, spec: v == getattr(spec.params["attention"], field), f"attention.{field}",
                 f"an attention {field.replace('_', ' ')} that differs from layer to layer")


# Sinks and one bias flag on every attention projection; any layer sliding or full with one
# window size; every layer's MLP the biased experts with the clamped SwiGLU.
ATTENTION = gqa(window=ANY, sinks=only(True, why="attention without sinks (GptOssAttention always has them)"))
EXPRESSES = Expresses(
    groups={"position": rope_position(), "norm": RMSNORM,
            "activation": {"swiglu_clamped": {"alpha": ANY, "limit": ANY}}, "attention": ATTENTION,
            "ffn": moe(expert_bias=only(True), router_bias=only(True)),
            "topology": {"decoder_only": TOPOLOGY}},
    model=PLAIN_MODEL,
    layers={"attention": {"gqa": {**{f: _same(f) for f in ("num_kv_heads", "qkv_bias", "out_bias", "scale",
                                                           "qk_norm", "softcap", "sinks")}, "window": ANY}}},
    rules=(Rule("model.layer_pattern", lambda spec: sorted({w for w in gemma.windows(spec) if w is not None}),
                lambda spec: len({w for w in gemma.windows(spec) if w is not None}) <= 1, "one window size",
                "windows of several sizes (gpt-oss has one sliding_window)"),))

TYPES = (ModelType("gpt_oss", "GptOssForCausalLM", overrides, hf_config, tensors, llama.IGNORE,
                   expresses=EXPRESSES, defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),)

guess = family_guess(TYPES)
