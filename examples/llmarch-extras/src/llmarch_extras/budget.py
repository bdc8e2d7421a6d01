"""A task: the longest context whose weights and KV cache fit a memory budget
(`task=context_budget`), from the architecture card, without building the model.

Registered with `@register("task", ...)`, found through this package's entry point.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmarch_compose import ConfigError, register, resolve_spec
from llmarch_compose.config.structured import to_dataclass
from llmarch_compose.model.card import DTYPE_BYTES, architecture_card


@dataclass
class ContextBudgetTask:
    name: str = "context_budget"
    memory_gib: float = 16.0  # the accelerator memory for weights and the KV cache of one sequence
    dtype: str = "bfloat16"  # of the weights and the cache
    format: str = "text"  # text | json


@register("task", "context_budget", params=ContextBudgetTask)
def run(cfg) -> dict[str, Any]:
    """`task=context_budget`: the longest context whose weights and KV cache fit a memory budget."""
    task = to_dataclass(ContextBudgetTask, cfg.task, "task")  # typed, unknown keys named
    if not task.memory_gib > 0:
        raise ConfigError("task.memory_gib", task.memory_gib, "must be positive", "a number of GiB > 0")
    if task.dtype not in DTYPE_BYTES:
        raise ConfigError("task.dtype", task.dtype, "unknown dtype", sorted(DTYPE_BYTES))
    card = architecture_card(resolve_spec(cfg), dtype=task.dtype)
    left = task.memory_gib * 2**30 - card["inference_weight_bytes"]
    per_token = card["kv_cache_bytes_per_token"]
    tokens = max(0, int(left // per_token)) if per_token else None  # None: no cache (no attention)
    result = {"model": card["model"], "memory_gib": task.memory_gib, "weight_bytes": card["inference_weight_bytes"],
              "kv_cache_bytes_per_token": per_token, "max_context_tokens": tokens}
    if task.format not in ("text", "json"):
        raise ConfigError("task.format", task.format, "unknown output format", ["text", "json"])
    if task.format == "json":
        print(json.dumps(result))
    elif tokens is None:
        print(f"{card['model']}: no KV cache")
    else:
        print(f"{card['model']}: {tokens:,} tokens of context fit in {task.memory_gib:g} GiB "
              f"({per_token:,} KV-cache bytes per token beside {card['inference_weight_bytes'] / 2**30:.2f} GiB "
              "of weights)")
    return result
