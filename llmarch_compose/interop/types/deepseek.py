"""The DeepSeek family: deepseek_v3 (transformers' DeepseekV3ForCausalLM; DeepSeek-V3, R1)
and deepseek_v2 (DeepseekV2ForCausalLM; DeepSeek-V2, -V2-Lite, -Coder-V2).

- Attention is multi-head latent attention: our attention=mla, whose module
  names are transformers' (`q_proj`, or `q_a_proj`/`q_a_layernorm`/`q_b_proj`
  when `q_lora_rank` is set; `kv_a_proj_with_mqa`, `kv_a_layernorm`,
  `kv_b_proj`, `o_proj`). `rope_interleave` is `model.rope_interleaved`; YaRN's
  mscale/mscale_all_dim go to `model.rope_scaling` (MLA also scales its softmax).
- The first `first_k_dense_replace` layers have a dense MLP of
  `intermediate_size` (`model.layer_pattern: [{stop: k, ffn: dense}]`), the
  others our ffn=deepseek_moe: sigmoid scores, group-limited top-k, the
  selection bias `mlp.gate.e_score_correction_bias` as our persistent
  `ffn.score_bias` buffer, `n_shared_experts` always-on experts
  (`mlp.shared_experts`, one MLP of their summed width).
- deepseek_v2 differs in its router and its rotation: softmax scores, the top k
  taken as they are (`topk_method: greedy`; transformers never renormalizes them,
  whatever `norm_topk_prob` says, so true is refused), scaled by
  `routed_scaling_factor`: our ffn=moe with shared experts; no selection bias;
  RoPE always on interleaved pairs (no `rope_interleave` field). Its
  `group_limited_greedy` rates a group by its best expert alone (V3: its best
  two): refused unless every group is kept (DeepSeek-V2 236B uses it; -V2-Lite
  is greedy). `mlp_bias` (biases on the dense and shared MLPs) is refused.
- The multi-token-prediction layer (`num_nextn_predict_layers`, stored as
  layer 61 of DeepSeek-V3) is not part of the model transformers builds; it is
  skipped on reading, and written checkpoints say they have none.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ...errors import ConfigError
from ..fit import ANY, Expresses, Rule, only, where
from ..mapping import ModelType, TensorRule, override
from . import llama
from .common import (GATED, GATED_BACK, PLAIN_MODEL, TOPOLOGY, activation, activation_back, dense, family_guess,
                     moe, numbers, refuse, rope, rope_back, rope_position, unused)
from .qwen_moe import (ONE_DENSE_WIDTH, dense_layers, dense_width, expert_rules, mlp_rules,
                       shared_rules)

LAYER, BLOCK = llama.LAYER, llama.BLOCK
#: transformers builds q_a_layernorm and kv_a_layernorm with DeepseekV3RMSNorm's default
#: epsilon, whatever rms_norm_eps says; ours use one epsilon for every norm.
LATENT_NORM_EPS = 1e-6

# DeepseekV3Config()'s defaults, for fields a config.json leaves out.
DEFAULTS = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
            "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
            "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
            "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu",
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "pad_token_id": None, "bos_token_id": 0,
            "eos_token_id": 1, "pretraining_tp": 1, "tie_word_embeddings": False, "rope_interleave": True,
            "attention_bias": False, "rope_theta": 10000.0, "rope_parameters": None, "num_mtp_layers": 1}
# DeepseekV2Config()'s defaults.
DEFAULTS_V2 = {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
               "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "pad_token_id": None, "bos_token_id": 1,
               "eos_token_id": 2, "pretraining_tp": 1, "tie_word_embeddings": False, "rope_parameters": None,
               "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False, "head_dim": None,
               "first_k_dense_replace": 0, "kv_lora_rank": 512, "q_lora_rank": 1536, "n_group": None,
               "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
               "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy", "norm_topk_prob": False,
               "v_head_dim": 128, "num_experts_per_tok": None, "moe_intermediate_size": 1407}
AUX_LOSS_ALPHA = 0.0001  # DeepSeek's own config.json field, which DeepseekV3Config does not define
#: The fields of DeepSeek's own config.json that DeepseekV3Config does not define, at the values
#: under which transformers' code is the model (the others are refused on reading).
EXTRA_FIELDS = {"aux_loss_alpha": AUX_LOSS_ALPHA, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                "moe_layer_freq": 1, "seq_aux": True, "ep_size": 1, "num_nextn_predict_layers": 1,
                "head_dim": None, "qk_head_dim": None}

#: DeepSeek-V2's config.json fields that DeepseekV2Config does not define.
EXTRA_FIELDS_V2 = {"aux_loss_alpha": AUX_LOSS_ALPHA, "scoring_func": "softmax", "moe_layer_freq": 1, "seq_aux": True,
                   "ep_size": 1, "qk_head_dim": None}

NUMBERS = {
    "hidden_size": "model.d_model", "num_hidden_layers": "model.n_layers", "num_attention_heads": "model.n_heads",
    "intermediate_size": "model.ffn_dim", "vocab_size": "model.vocab_size",
    "max_position_embeddings": "model.max_seq_len", "rms_norm_eps": "model.norm_eps",
    "attention_bias": "model.attention_bias", "kv_lora_rank": "model.kv_lora_rank",
    "qk_rope_head_dim": "model.qk_rope_head_dim", "qk_nope_head_dim": "model.qk_nope_head_dim",
    "v_head_dim": "model.v_head_dim", "n_routed_experts": "model.n_experts",
    "num_experts_per_tok": "model.experts_per_token", "moe_intermediate_size": "model.expert_ffn_dim",
    "n_shared_experts": "model.n_shared_experts", "routed_scaling_factor": "model.routed_scaling_factor",
}


# ------------------------------------------------------------------ config: HF -> ours

def _refusals(hf: Mapping[str, Any], v2: bool = False) -> None:
    refuse(hf, "pretraining_tp", "tensor-parallel slicing of the projections", allowed=(None, 1))
    # Fields of DeepSeek's own config.json that transformers ignores: only the values its code has.
    if v2:
        refuse(hf, "scoring_func", "DeepseekV2ForCausalLM scores experts by softmax", allowed=(None, "softmax"))
        refuse(hf, "norm_topk_prob", "DeepseekV2ForCausalLM never renormalizes the chosen weights",
               allowed=(None, False))
        refuse(hf, "mlp_bias", "biases on the dense and shared-expert MLPs", allowed=(None, False))
        method = hf["topk_method"]
        groups, kept = hf["n_group"] or 1, hf["topk_group"] or 1
        if method not in ("greedy", "group_limited_greedy") or (method == "group_limited_greedy" and kept < groups):
            raise ConfigError("topk_method", method, "cannot be represented: group-limited routing that rates a "
                              f"group by its best expert (n_group={groups}, topk_group={kept}); ours rates it by "
                              "its best two", ["greedy", "group_limited_greedy with topk_group = n_group"])
    else:
        refuse(hf, "scoring_func", "DeepseekV3ForCausalLM scores experts by sigmoid", allowed=(None, "sigmoid"))
        refuse(hf, "topk_method", "DeepseekV3ForCausalLM chooses by biased scores within groups",
               allowed=(None, "noaux_tc"))
    refuse(hf, "moe_layer_freq", "every layer from first_k_dense_replace on has experts", allowed=(None, 1))
    heads = hf["num_attention_heads"]
    refuse(hf, "num_key_value_heads", "MLA expands keys and values for every head", allowed=(None, heads))
    eps = hf["rms_norm_eps"]
    if eps != LATENT_NORM_EPS:
        raise ConfigError("rms_norm_eps", eps, "cannot be represented: transformers normalizes the MLA latents "
                          f"with epsilon {LATENT_NORM_EPS} whatever rms_norm_eps says, and ours use one epsilon "
                          "for every norm", [LATENT_NORM_EPS])
    if not hf.get("n_shared_experts"):
        raise ConfigError("n_shared_experts", hf.get("n_shared_experts"), "cannot be represented: transformers "
                          "builds the shared expert MLP whatever its width", "an integer >= 1")
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    fraction = hf.get("partial_rotary_factor", params.get("partial_rotary_factor"))
    if fraction not in (None, 1, 1.0):
        raise ConfigError("partial_rotary_factor", fraction, "cannot be represented: MLA rotates its whole "
                          "qk_rope_head_dim", [None, 1.0])
    # Training-time sequence balance, expert placement over ranks, and the multi-token-prediction
    # layers transformers does not build: none changes the function of the weights it loads.
    unused(hf, "seq_aux", "ep_size", "num_nextn_predict_layers", "num_mtp_layers")
    # The config classes derive both (qk_rope_head_dim, and nope + rope), whatever the file says.
    unused(hf, "head_dim", "qk_head_dim")


def _common(hf: Mapping[str, Any], name: str) -> list[str]:
    return [
        "position=rope", "norm=rmsnorm", f"activation={activation(hf, 'hidden_act', gated=True)}",
        "topology=decoder_only", "attention=mla", override("model.name", f"hf:{name}"),
        *numbers(hf, NUMBERS), *rope(hf),
        # MLA's own rotary width; the shared rope plugin then rotates that same width.
        override("model.head_dim", hf["qk_rope_head_dim"]), "model.rotary_fraction=1.0",
        override("model.n_kv_heads", hf["num_attention_heads"]),
        override("model.q_lora_rank", hf["q_lora_rank"]),
        override("model.tie_embeddings", bool(hf["tie_word_embeddings"])),
        override("model.router_aux_loss_coef", hf.get("aux_loss_alpha", AUX_LOSS_ALPHA)),
    ]


def _dense_first(hf: Mapping[str, Any]) -> list[str]:
    n_layers, first_dense = hf["num_hidden_layers"], hf["first_k_dense_replace"] or 0
    return [override("model.layer_pattern", [{"stop": min(first_dense, n_layers), "ffn": "dense"}])] if first_dense \
        else []


def overrides_v2(hf: Mapping[str, Any]) -> list[str]:
    _refusals(hf, v2=True)
    # Softmax scores, the top k as they are (greedy, or groups that all stay), always-on shared experts.
    return [*_common(hf, "deepseek_v2"), "ffn=moe", "model.rope_interleaved=true", "model.n_expert_groups=1",
            "model.topk_expert_groups=1", "ffn.normalize_top_k=false", *_dense_first(hf)]


def overrides(hf: Mapping[str, Any]) -> list[str]:
    _refusals(hf)
    out = [
        *_common(hf, "deepseek_v3"), "ffn=deepseek_moe",
        override("model.rope_interleaved", bool(hf["rope_interleave"])),
        override("model.n_expert_groups", hf["n_group"] or 1),
        override("model.topk_expert_groups", hf["topk_group"] or 1),
        override("ffn.normalize_top_k", bool(hf["norm_topk_prob"])),
    ]
    return [*out, *_dense_first(hf)]


# ------------------------------------------------------------------ config: ours -> HF

def _first_dense(spec: Any) -> Optional[int]:
    """k when exactly the layers 0 .. k-1 are made dense by the layer pattern, else None."""
    dense = sorted(dense_layers(spec))
    return len(dense) if dense == list(range(len(dense))) else None


# MLA, sigmoid-scored experts chosen within groups, always-on shared experts, and
# (first_k_dense_replace) a dense MLP in the first layers, all of one width.
EXPRESSES = Expresses(
    groups={
        "position": rope_position(interleaved=ANY), "activation": GATED,
        # One epsilon for every norm, and transformers gives the MLA latents' norms 1e-6.
        "norm": {"rmsnorm": {"eps": only(LATENT_NORM_EPS, why="norms with another epsilon than the MLA "
                                                               "latents' (transformers fixes those at 1e-6)")}},
        "attention": {"mla": {"q_lora_rank": ANY, "kv_lora_rank": ANY, "qk_rope_head_dim": ANY,
                              "qk_nope_head_dim": ANY, "v_head_dim": ANY, "bias": ANY, "window": only(None),
                              "scale": only(None)}},
        "ffn": moe(router=only("sigmoid"), normalize_top_k=ANY, topk_groups=ANY, routed_scaling=ANY,
                   bias_update_rate=ANY,
                   shared_experts=where(lambda v, spec: v >= 1, "an integer >= 1",
                                        "DeepSeek-V3 without shared experts")),
        "topology": {"decoder_only": TOPOLOGY},
    },
    model=PLAIN_MODEL, layers={"ffn": dense()},
    rules=(Rule("model.layer_pattern", lambda spec: list(spec.model.layer_pattern),
                lambda spec: _first_dense(spec) is not None, "dense layers 0 .. k-1 (first_k_dense_replace)",
                "dense layers other than the first ones"),
           ONE_DENSE_WIDTH,
           Rule("ffn.n_groups", lambda spec: spec.params["ffn"].n_groups,
                lambda spec: spec.params["ffn"].num_experts // spec.params["ffn"].n_groups >= 2,
                "at most num_experts / 2", "groups of one expert (a group is rated by its best two)")),
)


# DeepSeek-V2: MLA as V3's (RoPE always on interleaved pairs), softmax-scored experts whose top k
# are taken as they are and scaled, always-on shared experts, dense first layers.
EXPRESSES_V2 = Expresses(
    groups={**EXPRESSES.groups, "position": rope_position(interleaved=only(True)),
            "ffn": moe(normalize_top_k=only(False), routed_scaling=ANY,
                       shared_experts=where(lambda v, spec: v >= 1, "an integer >= 1",
                                            "DeepSeek-V2 without shared experts"))},
    model=PLAIN_MODEL, layers={"ffn": dense()}, rules=EXPRESSES.rules[:2])


def hf_config_v2(spec: Any) -> dict[str, Any]:
    out = hf_config(spec)
    for key in ("rope_interleave", "num_nextn_predict_layers"):  # always interleaved; no MTP layers
        del out[key]
    return {**out, "topk_method": "greedy", "n_group": None, "topk_group": None, "mlp_bias": False}


def hf_config(spec: Any) -> dict[str, Any]:
    m, attention, ffn = spec.model, spec.params["attention"], spec.params["ffn"]
    d = attention.dims(m)
    width = dense_width(spec)
    rope_fields = rope_back(spec)
    rope_fields.pop("partial_rotary_factor", None)  # MLA rotates all of qk_rope_head_dim
    return {
        "hidden_size": m.d_model, "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_heads, "intermediate_size": width, "vocab_size": m.vocab_size,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": spec.params["norm"].eps,
        "tie_word_embeddings": m.tie_embeddings, "hidden_act": activation_back(spec, GATED_BACK),
        "attention_bias": attention.bias,
        "q_lora_rank": d.q_lora, "kv_lora_rank": d.kv_lora, "qk_rope_head_dim": d.rope,
        "qk_nope_head_dim": d.nope, "v_head_dim": d.v, "rope_interleave": spec.params["position"].interleaved,
        "n_routed_experts": ffn.num_experts, "num_experts_per_tok": ffn.top_k, "moe_intermediate_size": ffn.hidden,
        "n_shared_experts": ffn.shared_experts, "n_group": ffn.n_groups, "topk_group": ffn.topk_groups,
        "routed_scaling_factor": ffn.routed_scaling, "norm_topk_prob": ffn.normalize_top_k,
        "first_k_dense_replace": _first_dense(spec), "num_nextn_predict_layers": 0, **rope_fields,
    }


# ------------------------------------------------------------------ tensors

def tensors(spec: Any) -> list[TensorRule]:
    m, attention = spec.model, spec.params["attention"]
    attn, theirs = BLOCK + "attn.", LAYER + "self_attn."
    names = ["kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "kv_b_proj.weight", "o_proj.weight"]
    q_lora = attention.dims(m).q_lora
    names += ["q_proj.weight"] if q_lora is None else ["q_a_proj.weight", "q_a_layernorm.weight",
                                                              "q_b_proj.weight"]
    if attention.bias:
        names += ["kv_a_proj_with_mqa.bias", "o_proj.bias"] + ([] if q_lora is None else ["q_a_proj.bias"])
    rules = [
        TensorRule("embed.tokens.weight", ("model.embed_tokens.weight",)),
        TensorRule(BLOCK + "attn_norm.weight", (LAYER + "input_layernorm.weight",)),
        TensorRule(BLOCK + "ffn_norm.weight", (LAYER + "post_attention_layernorm.weight",)),
        TensorRule("decoder.final_norm.weight", ("model.norm.weight",)),
        *(TensorRule(attn + name, (theirs + name,)) for name in names),
    ]
    if not m.tie_embeddings:
        rules.append(TensorRule("head.weight", ("lm_head.weight",)))
    for i in range(m.n_layers):
        ffn = spec.params_for("ffn", i)
        if ffn.plugin == "dense":
            rules += mlp_rules(i, ffn.hidden)
            continue
        rules += [*expert_rules(i, ffn), *shared_rules(i, ffn, "shared_experts")]
        if ffn.router == "sigmoid":  # V3's selection bias (a buffer of ours)
            rules.append(TensorRule(BLOCK.format(i=i) + "ffn.score_bias",
                                    (LAYER.format(i=i) + "mlp.gate.e_score_correction_bias",)))
    return rules


# DeepSeek-V3 stores its multi-token-prediction layer as layer 61; transformers skips it the same way.
IGNORE = (*llama.IGNORE, "model.layers.61.")

TYPES = (ModelType("deepseek_v3", "DeepseekV3ForCausalLM", overrides, hf_config, tensors, IGNORE, expresses=EXPRESSES,
                  defaults=DEFAULTS, extra_fields=EXTRA_FIELDS),
         ModelType("deepseek_v2", "DeepseekV2ForCausalLM", overrides_v2, hf_config_v2, tensors, llama.IGNORE,
                   expresses=EXPRESSES_V2, defaults=DEFAULTS_V2, extra_fields=EXTRA_FIELDS_V2))

guess = family_guess(TYPES)
