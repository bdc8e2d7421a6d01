"""The `scale` group: shrink any preset to test size, keeping what makes it that model.

`scale=tiny` rewrites the `model.` numbers before anything reads them, so every
group node that interpolates them sees the small values. It keeps the
structure: the group choices, the layer pattern (at least 4 layers, so
DeepSeek keeps dense and MoE layers; more where a rule's first layer lies further in,
as Gemma-3's global layer is the sixth), MHA / GQA / MQA (as the ratio of KV heads
to heads), factorized embeddings, latent attention, shared experts and expert
groups, partial rotary (its share rounded to an even number of rotating dimensions
where the small head needs it). `scale=full` changes nothing. Tune a scale with `scale.d_model=128` etc.:
a `model.` override is replaced by the scale's value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from ..plugin.registry import add
from .structured import to_dataclass


@dataclass
class ScaleConfig:
    name: str = "full"
    d_model: Optional[int] = None  # None: keep the preset's numbers
    n_heads: int = 4
    head_dim: int = 16
    n_layers: int = 4  # at most this many
    ffn_dim: int = 128
    expert_ffn_dim: int = 32
    vocab_size: int = 512
    max_seq_len: int = 128
    window: int = 32  # at most this wide
    embedding_dim: int = 32  # only where the preset factorizes its embeddings
    n_experts: int = 8  # at most
    experts_per_token: int = 2  # at most
    latent_rank: int = 32  # MLA's q and kv ranks, where the preset has them
    rope_head_dim: int = 8  # MLA's decoupled rotary part


add("scale", "full", node=ScaleConfig())
add("scale", "tiny", node=ScaleConfig(name="tiny", d_model=64))


def _pattern_depth(model: dict[str, Any]) -> int:
    """How many layers every model.layer_pattern rule needs to select one (0 without rules;
    a rule that is wrong or selects nothing is left to the spec's validation to report)."""
    from .layer_patterns import STACKS, parse_rules
    from ..errors import ConfigError

    try:
        rules = parse_rules(model.get("layer_pattern") or [])
    except ConfigError:
        return 0
    depth = 0
    for rule in rules:
        first = next((i for i in range(model["n_layers"]) if any(rule.selects(i, st) for st in STACKS)), None)
        if first is not None:
            depth = max(depth, first + 1)
    return depth


def scaled_numbers(model: dict[str, Any], s: ScaleConfig) -> dict[str, Any]:
    """The `model.` numbers of `model` at scale `s` (a plain mapping in, one out)."""
    heads, kv = model["n_heads"], model["n_kv_heads"]
    n_experts = min(model["n_experts"], s.n_experts)
    groups = model["n_expert_groups"] if n_experts % model["n_expert_groups"] == 0 else 1
    out = dict(
        name=f"{model['name']}@{s.name}",
        d_model=s.d_model,
        n_heads=s.n_heads,
        # MHA stays MHA, MQA stays MQA, anything between becomes 2 KV heads.
        n_kv_heads=s.n_heads if kv == heads else 1 if kv == 1 else 2,
        head_dim=s.head_dim,
        n_layers=min(model["n_layers"], max(s.n_layers, _pattern_depth(model))),
        ffn_dim=s.ffn_dim,
        expert_ffn_dim=s.expert_ffn_dim,
        vocab_size=s.vocab_size,
        max_seq_len=s.max_seq_len,
        window=min(model["window"], s.window) if model["window"] else model["window"],
        embedding_dim=s.embedding_dim if model["embedding_dim"] else None,
        n_experts=n_experts,
        experts_per_token=min(model["experts_per_token"], s.experts_per_token, n_experts),
        n_expert_groups=groups,
        topk_expert_groups=min(model["topk_expert_groups"], groups),
    )
    for key in ("q_lora_rank", "kv_lora_rank"):
        out[key] = s.latent_rank if model[key] else model[key]
    for key in ("qk_nope_head_dim", "v_head_dim"):
        out[key] = s.head_dim if model[key] else model[key]
    out["qk_rope_head_dim"] = s.rope_head_dim if model["qk_rope_head_dim"] else model["qk_rope_head_dim"]
    out["rotary_fraction"] = rotary_fraction(model["rotary_fraction"], s.head_dim)
    return out


def rotary_fraction(fraction: float, head_dim: int) -> float:
    """A partial rotary share on a `head_dim`-wide head: kept where it rotates an even number
    of dimensions, else the nearest share that does (at least 2, less than the whole head
    when the share was less): Phi-2's 0.4 of 80 (32) is 6 of 16 at scale=tiny."""
    dims = fraction * head_dim
    if dims == int(dims) and int(dims) % 2 == 0:
        return fraction
    even = max(2, round(dims / 2) * 2)
    if fraction < 1.0:
        even = min(even, head_dim - 2)
    return even / head_dim


def apply_scale(cfg: DictConfig) -> DictConfig:
    """`cfg` with its model numbers at the chosen scale (a copy; `cfg` is unchanged)."""
    node = cfg.get("scale")
    if node is None or node.get("d_model") is None:
        return cfg
    s = to_dataclass(ScaleConfig, node, "scale")
    model = OmegaConf.to_container(cfg.model, resolve=True)
    scaled = cfg.copy()
    with open_dict(scaled):
        for key, value in scaled_numbers(model, s).items():
            scaled.model[key] = value
        scaled.scale = OmegaConf.structured(ScaleConfig(name=s.name))  # applied: a second pass changes nothing
    return scaled
