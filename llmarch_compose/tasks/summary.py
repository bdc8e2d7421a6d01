"""`task=summary`: the architecture card, built on `meta` (seconds, no memory)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from ..model.card import DTYPE_BYTES, architecture_card, human, human_bytes
from ..errors import ConfigError
from ..config.spec import resolve_spec
from ..config.structured import to_dataclass
from ..plugin.registry import register

FORMATS = ("text", "json")


@dataclass
class SummaryTask:
    name: str = "summary"
    format: str = "text"  # text | json
    dtype: str = "bfloat16"  # for inference weights and the KV cache
    context: Optional[int] = None  # tokens for attention FLOPs and the full KV cache; None: model.max_seq_len


def card_for(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(SummaryTask, cfg.task, "task")
    if task.format not in FORMATS:
        raise ConfigError("task.format", task.format, "unknown output format", FORMATS)
    if task.dtype not in DTYPE_BYTES:
        raise ConfigError("task.dtype", task.dtype, "unknown dtype", sorted(DTYPE_BYTES))
    if task.context is not None and task.context < 1:
        raise ConfigError("task.context", task.context, "must be at least one token", "an integer >= 1")
    return architecture_card(resolve_spec(cfg), dtype=task.dtype, context=task.context)


def render_text(card: dict[str, Any]) -> str:
    d = card["dimensions"]
    lines = [f"Architecture card: {card['model']}", ""]
    lines.append("Components")
    for group, choice in card["components"].items():
        plugin = card["plugins"][group]
        lines.append(f"  {group:<11} {choice}" + (f"  (plugin {plugin})" if plugin != choice else ""))
    lines += ["", "Dimensions"]
    lines += [f"  {k:<15} {v}" for k, v in d.items()]
    if card.get("unused"):
        lines.append(f"  {'unused':<15} {', '.join(card['unused'])} (set by the preset, read by no chosen plugin)")
    lines += [
        "", "Parameters",
        f"  total           {card['params_total']:,}",
        f"  embedding       {card['params_embedding']:,}",
        f"  non-embedding   {card['params_non_embedding']:,}",
        f"  active / token  {card['params_active']:,}",
        "", f"Compute (forward, per token, at {card['context']:,} tokens of context)",
        f"  matmul          {human(card['flops_matmul'], 'FLOP')}",
        f"  attention       {human(card['flops_attention'], 'FLOP')}",
        f"  total           {human(card['flops_per_token'], 'FLOP')}",
        "", f"KV cache ({card['kv_cache_dtype']})",
        f"  per token       {human_bytes(card['kv_cache_bytes_per_token'])} ({card['kv_cache_bytes_per_token']:,} B)",
        f"  full context    {human_bytes(card['kv_cache_bytes_full_context'])}",
        "", "Memory",
        f"  inference weights ({card['kv_cache_dtype']})  {human_bytes(card['inference_weight_bytes'])}",
    ]
    train = card["training_memory_fp32_adamw_bytes"]
    lines.append(f"  training, fp32 + AdamW    {human_bytes(train['total'])} "
                 f"(weights {human_bytes(train['weights'])}, gradients {human_bytes(train['gradients'])}, "
                 f"AdamW {human_bytes(train['adamw_states'])}; activations not included)")
    if card.get("match"):
        lines += _match_lines(card["match"])
    return "\n".join(lines)


def _match_lines(match: dict[str, Any]) -> list[str]:
    """model.match: which dimension moved, to what, and how close the figure came."""
    source = f" ({match['target_from']})" if match["target_from"] else ""
    return ["", f"Matched ({match['figure']}, the card's {match['card_key']}, by {match['by']})",
            f"  {match['by']:<15} {match['value']:,} (a multiple of {match['multiple']})",
            f"  target          {match['target']:,.0f}{source}",
            f"  {match['figure']:<15} {match['achieved']:,.0f} ({match['difference_pct']:+.3f}% from the target)"]


@register("task", "summary", params=SummaryTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    card = card_for(cfg)
    print(json.dumps(card) if cfg.task.format == "json" else render_text(card))
    return card
