"""The cost model behind the architecture card: exact parameter counts, FLOPs,
KV-cache and training-memory figures, all from a model built on `meta`."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..plugin import registry as plugins
from .build import build
from ..plugin.interfaces import Attention, FeedForward, LayerStack
from ..config.spec import ModelSpec
from ..errors import ConfigError

DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1, "fp8": 1}


def human(n: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}{unit}"
    return f"{n:g} {unit}".rstrip()


def human_bytes(n: float) -> str:
    for scale, suffix in ((2**60, "EiB"), (2**50, "PiB"), (2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"),
                          (2**10, "KiB")):
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
        active = module.active_matmul_params() if isinstance(module, FeedForward) else None
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


def training_memory(total_params: int, param_bytes: int = 4) -> dict[str, int]:
    """Weights, gradients and AdamW's two moments, all in the weights' dtype (fp32 by
    default); activations depend on batch and sequence and are not included."""
    weights = total_params * param_bytes
    grads = total_params * param_bytes
    optimizer = total_params * 2 * param_bytes
    return {"weights": weights, "gradients": grads, "adamw_states": optimizer, "total": weights + grads + optimizer}


def activation_memory(model: nn.Module, counts: dict[str, int], d_model: int, n_heads: int, vocab_size: int,
                      batch_size: int, seq_len: int, dtype_bytes: int, logit_tokens: Optional[int] = None,
                      recompute: str = "none") -> dict[str, int]:
    """What one training step keeps for the backward pass, a conservative estimate (eager
    autograd; a compiled graph or a fused attention kernel keeps less). Per token:

    - every projection: twice its output width, its output and what the next operation
      keeps of it (the activation's input, a gate). A projection's output width is its
      weight elements a token passes through over d_model, so the FFN counts
      2 x 3 x ffn_dim for a gated FFN, and only the experts a token is routed to;
    - each attention layer: its scores and probabilities, 2 x n_heads x seq_len (where
      the math path materializes them), and 4 x d_model for its norm and residual;
    - each FFN layer: 4 x d_model for its norm and residual; the embedding 2 x d_model;

    all in `dtype_bytes`, times batch_size x seq_len tokens, every use of a shared layer
    counted. Logits: batch_size x seq_len x vocab_size x 3 in fp32 (the logits the loss
    reads, their log-softmax and its gradient), or `logit_tokens` tokens' worth of them
    where the loss runs in chunks. With `recompute="full"` (activation checkpointing) each
    block keeps only its input, d_model per token, and one block's activations exist at a
    time; `selective` is counted as none (conservatively)."""
    runs = runs_per_token(model)
    attention = sum(times for m, times in runs if isinstance(m, Attention))
    ffn = sum(times for m, times in _outermost(runs, FeedForward))
    projected = forward_flops_per_token(model, counts, seq_len)["flops_matmul"] / 2 / d_model
    per_token = 2 * projected + attention * (2 * n_heads * seq_len + 4 * d_model) + ffn * 4 * d_model + 2 * d_model
    tokens = batch_size * seq_len
    if recompute == "full":
        blocks = max(1, attention)
        per_token = blocks * d_model + 2 * d_model + per_token / blocks
    logit_rows = tokens if not logit_tokens else min(tokens, logit_tokens)
    return {"activations": int(tokens * per_token * dtype_bytes), "logits": logit_rows * vocab_size * 3 * 4}


def _outermost(runs: list[tuple[nn.Module, int]], kind: type) -> list[tuple[nn.Module, int]]:
    """The modules of `kind` not inside another (an MoE layer's experts are FFNs too)."""
    inner = {id(sub) for m, _ in runs if isinstance(m, kind) for sub in m.modules() if sub is not m}
    return [(m, times) for m, times in runs if isinstance(m, kind) and id(m) not in inner]


MEMINFO = Path("/proc/meminfo")


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes a run may still allocate on `device`: free CUDA memory, or MemAvailable of
    /proc/meminfo (else the free physical pages); None where unknown (meta)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def run_memory(spec: ModelSpec, batch_size: int, seq_len: int, param_dtype: torch.dtype,
               logit_tokens: Optional[int] = None, recompute: str = "none") -> dict[str, int]:
    """The memory a training step of `spec` needs: weights, gradients, AdamW states and
    activations (see `activation_memory`), from the model built on meta."""
    model = build(spec, device="meta")
    counts = count_params(model)
    m = spec.model
    param_bytes = param_dtype.itemsize
    state = training_memory(counts["params_total"], param_bytes)
    # Autocast computes in a narrower dtype but keeps norms and softmax in fp32: count the weights' dtype.
    acts = activation_memory(model, counts, m.d_model, m.n_heads, m.vocab_size, batch_size, seq_len, param_bytes,
                             logit_tokens, recompute)
    parts = {k: state[k] for k in ("weights", "gradients", "adamw_states")} | acts
    return {**parts, "total": sum(parts.values()), **counts}


#: The keys that drive a run's size, named in the preflight's error.
SIZE_KEYS = ("model.d_model", "model.n_layers", "model.ffn_dim", "model.vocab_size", "model.n_heads",
             "task.batch_size", "task.seq_len")


def _blame(spec: ModelSpec, needs: dict[str, int], batch_size: int, seq_len: int) -> tuple[str, Any, str]:
    """The key most to blame for `needs`, its value and what to make smaller: the largest
    of what grows with the vocabulary (logits, the embedding's share of the weights and
    their states), with the tokens of a step (activations) and with the other weights."""
    m = spec.model
    state = needs["weights"] + needs["gradients"] + needs["adamw_states"]
    embedding_state = state * needs["params_embedding"] / max(needs["params_total"], 1)
    by_vocab, by_tokens, by_weights = needs["logits"] + embedding_state, needs["activations"], state - embedding_state
    deep = m.n_layers * 32 > m.d_model  # deeper than wide, for a transformer
    if by_vocab >= max(by_tokens, by_weights):
        return "model.vocab_size", m.vocab_size, "a smaller vocab_size, batch_size or seq_len"
    if by_tokens >= by_weights and not deep:
        if seq_len > 64 * batch_size:
            return "task.seq_len", seq_len, "a shorter seq_len, a smaller batch_size or model"
        return "task.batch_size", batch_size, "a smaller batch_size, a shorter seq_len or a smaller model"
    if by_weights > by_tokens and needs["params_active"] * 2 < needs["params_total"]:  # mostly unused experts
        return "model.n_experts", m.n_experts, "fewer experts, or a smaller model"
    if by_weights > by_tokens and m.ffn_dim > 8 * m.d_model:
        return "model.ffn_dim", m.ffn_dim, "a smaller ffn_dim or model"
    if deep:
        return "model.n_layers", m.n_layers, "fewer layers, a smaller batch_size or model"
    return "model.d_model", m.d_model, "a smaller d_model or model"


def preflight(spec: ModelSpec, batch_size: int, seq_len: int, param_dtype: torch.dtype,
              device: torch.device, logit_tokens: Optional[int] = None, recompute: str = "none") -> dict[str, Any]:
    """Refuse, before anything is allocated, a training run that cannot fit on `device`:
    a ConfigError names the key most to blame, the estimate and what is available.
    Returns the estimate (`run_memory`) with `available` (None where unknown)."""
    needs = run_memory(spec, batch_size, seq_len, param_dtype, logit_tokens, recompute)
    available = available_memory(device)
    if available is not None and needs["total"] > available:
        key, value, valid = _blame(spec, needs, batch_size, seq_len)
        parts = ", ".join(f"{name.replace('_', ' ')} {human_bytes(needs[name])}"
                          for name in ("weights", "gradients", "adamw_states", "activations", "logits"))
        keys = [*SIZE_KEYS, "model.n_experts"] if needs["params_active"] < needs["params_total"] else SIZE_KEYS
        raise ConfigError(key, value, f"the run needs about {human_bytes(needs['total'])} ({parts}) and "
                                      f"{human_bytes(available)} is available on {device}; its size grows with "
                                      f"{', '.join(keys)}", valid)
    return {**needs, "available": available}


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
        # model.match: the dimension set to meet a budget, its value, the target and the difference
        "match": spec.match.record() if spec.match is not None else None,
    }
    return card


__all__ = ["architecture_card", "count_params", "unique_parameters", "DTYPE_BYTES", "preflight", "run_memory",
           "activation_memory", "available_memory"]
