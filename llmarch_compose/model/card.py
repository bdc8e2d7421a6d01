"""The cost model behind the architecture card: exact parameter counts, FLOPs,
KV-cache and training-memory figures, all from a model built on `meta`."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from ..plugin import registry as plugins
from .build import build
from ..plugin.interfaces import Attention, FeedForward, LayerStack
from ..config.spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1, "fp8": 1}


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for scale, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g} B"


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter once, tied tensors included once (buffers excluded)."""
    return list({id(p): p for p in model.parameters()}.values())


def count_params(model: nn.Module) -> dict[str, int]:
    params = unique_parameters(model)
    total = sum(p.numel() for p in params)
    embedding_ids = {id(p) for m in model.embedding_modules() for p in m.parameters()}
    embedding = sum(p.numel() for p in params if id(p) in embedding_ids)
    # Mixture-of-experts layers say how many of their parameters one token uses.
    inactive = sum(sum(p.numel() for p in m.parameters()) - active
                   for m in model.modules() if isinstance(m, FeedForward) and (active := m.active_params()) is not None)
    return {
        "params_total": total,
        "params_embedding": embedding,
        "params_non_embedding": total - embedding,
        "params_active": total - inactive,
    }


def runs_per_token(model: nn.Module) -> list[tuple[nn.Module, int]]:
    """Every module with how many times one token passes through it: a stack that
    runs its shared blocks n times (ALBERT) multiplies everything inside its blocks."""
    out: list[tuple[nn.Module, int]] = []

    def walk(module: nn.Module, times: int) -> None:
        out.append((module, times))
        for child in module.children():
            repeated = isinstance(module, LayerStack) and child is module.blocks
            walk(child, times * module.repeats if repeated else times)

    walk(model, 1)
    return out


def forward_flops_per_token(model: nn.Module, counts: dict[str, int], context: int) -> dict[str, float]:
    """2 FLOPs per weight-matrix element a token passes through (its active experts
    only, a shared block once per use), the LM head included, plus attention scores
    at `context` tokens. Lookups, norms, biases, activations and softmax are not counted.
    For a mixture of experts this is the cost of a dispatching kernel (top-k experts)."""
    matmul = 0
    inside_moe: set[int] = set()
    for module, times in runs_per_token(model):
        if id(module) in inside_moe or isinstance(module, nn.Embedding):
            continue
        active = module.active_params() if isinstance(module, FeedForward) else None
        if active is not None:  # a mixture of experts: the experts a token uses
            matmul += active * times
            inside_moe.update(id(m) for m in module.modules())
            continue
        matmul += sum(p.numel() for p in module.parameters(recurse=False) if p.dim() >= 2) * times
    tied = model.tied_embedding()  # a head that reuses the token table
    matmul += tied.weight.numel() if tied is not None else 0
    attention = sum(m.score_flops_per_token(context) * times
                    for m, times in runs_per_token(model) if isinstance(m, Attention))
    return {"flops_matmul": 2.0 * matmul, "flops_attention": float(attention),
            "flops_per_token": 2.0 * matmul + attention}


def kv_cache(model: nn.Module, dtype_bytes: int, context: int) -> dict[str, int]:
    layers = [(m, times) for m, times in runs_per_token(model) if isinstance(m, Attention)]
    per_token = sum(m.kv_cache_bytes_per_token(dtype_bytes) * times for m, times in layers)
    full = sum(m.kv_cache_bytes_per_token(dtype_bytes) * m.kv_cache_tokens(context) * times for m, times in layers)
    return {"kv_cache_bytes_per_token": per_token, "kv_cache_bytes_full_context": full}


def training_memory(total_params: int) -> dict[str, int]:
    """Weights, gradients and AdamW's two moments, all in fp32; activations depend on
    batch and sequence and are not included."""
    weights = total_params * 4
    grads = total_params * 4
    optimizer = total_params * 8
    return {"weights": weights, "gradients": grads, "adamw_states": optimizer, "total": weights + grads + optimizer}


def architecture_card(spec: ModelSpec, dtype: str = "bfloat16", context: int | None = None) -> dict[str, Any]:
    """Everything the summary task reports, as plain data (JSON-serializable)."""
    model = build(spec, device="meta")
    m = spec.model
    context = context or m.max_seq_len
    dtype_bytes = DTYPE_BYTES[dtype]
    counts = count_params(model)
    card: dict[str, Any] = {
        "model": m.name,
        "components": spec.components,
        "plugins": {g: spec.params[g].plugin for g in plugins.GROUPS},
        "dimensions": {
            "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
            "n_kv_heads": spec.plugin("attention").cls.key_value_heads(spec.params["attention"], m),
            "head_dim": m.head_dim, "ffn_dim": m.ffn_dim, "vocab_size": m.vocab_size,
            "max_seq_len": m.max_seq_len, "tie_embeddings": m.tie_embeddings,
        },
        "attention": {k: v for k, v in dataclasses.asdict(spec.params["attention"]).items()
                      if k not in ("plugin", "name")},
        "layer_pattern": list(m.layer_pattern),
        "unused": list(spec.unused),  # model keys the preset set that no chosen plugin reads
        **counts,
        "context": context,
        **forward_flops_per_token(model, counts, context),
        "kv_cache_dtype": dtype,
        **kv_cache(model, dtype_bytes, context),
        "inference_weight_bytes": counts["params_total"] * dtype_bytes,
        "training_memory_fp32_adamw_bytes": training_memory(counts["params_total"]),
    }
    return card


__all__ = ["architecture_card", "count_params", "unique_parameters", "DTYPE_BYTES"]
