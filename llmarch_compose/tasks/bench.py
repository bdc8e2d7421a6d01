"""`task=bench`: training and inference throughput, peak training memory and compile
time of the composed model, eager and compiled, against Hugging Face transformers
on the same weights; written as bench.md and bench.json (see llmarch_compose.bench.harness)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig

from ..bench.decode import DecodeOptions
from ..bench.harness import ADAMW, DEFAULT_VARIANTS, VARIANTS, BenchOptions, render_markdown, resolve_device_of, run_benchmark
from ..artifacts.atomic import write_atomic
from ..errors import ConfigError
from ..config.spec import resolve_spec
from ..config.structured import to_dataclass
from ..model.card import preflight
from ..model.precision import PrecisionConfig
from .train import output_dir
from ..plugin.registry import register


@dataclass
class BenchTask:
    name: str = "bench"
    steps: int = 5  # timed steps per variant (medians)
    warmup: int = 2  # untimed steps first (compilation, allocator warm-up)
    batch_size: int = 8
    seq_len: Optional[int] = None  # None: model.max_seq_len (after any scale)
    variants: List[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # of eager, compiled, chunked, selective, recompute, hf
    loss_chunk_tokens: int = 1024  # the chunked and recompute variants' LM-head chunk
    memory: bool = True  # peak memory of a training step per variant
    cold_compile: bool = True  # compile time with an empty inductor cache, in a fresh process
    compile_depths: List[int] = field(default_factory=list)  # also cold-compile at these depths
    threads: Optional[int] = None  # torch.set_num_threads; None: as found
    adamw: str = "fused"  # fused | foreach | for_loop (the same for every variant)
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)
    mode: str = "train"  # train: training and inference steps; decode: prefill, generation and the KV cache
    prompt_len: int = 64  # decode: the prompt of the generation runs
    new_tokens: int = 128  # decode: tokens generated per run
    decode_batch_sizes: List[int] = field(default_factory=lambda: [1, 8])
    contexts: List[int] = field(default_factory=lambda: [512, 2048, 8192])  # decode: per-token time at these
    hf_static: bool = True  # decode: also transformers' static cache, compiled


def options_for(task: BenchTask, max_seq_len: int) -> BenchOptions:
    for key, least in (("steps", 1), ("warmup", 1), ("batch_size", 1)):
        if getattr(task, key) < least:
            raise ConfigError(f"task.{key}", getattr(task, key), f"must be at least {least}", f"an integer >= {least}")
    seq_len = task.seq_len if task.seq_len is not None else max_seq_len
    if not 1 <= seq_len <= max_seq_len:
        raise ConfigError("task.seq_len", seq_len, f"must lie within model.max_seq_len={max_seq_len}",
                          f"1..{max_seq_len}")
    if task.loss_chunk_tokens < 1:
        raise ConfigError("task.loss_chunk_tokens", task.loss_chunk_tokens, "must be at least 1", "e.g. 1024")
    for variant in task.variants:
        if variant not in VARIANTS:
            raise ConfigError("task.variants", list(task.variants), f"unknown variant {variant!r}", VARIANTS)
    if not task.variants:
        raise ConfigError("task.variants", [], "nothing to measure", VARIANTS)
    for depth in task.compile_depths:
        if depth < 1:
            raise ConfigError("task.compile_depths", list(task.compile_depths), "a depth is at least one layer",
                              "integers >= 1")
    if task.threads is not None and task.threads < 1:
        raise ConfigError("task.threads", task.threads, "must be at least 1", "an integer >= 1, or null")
    if task.adamw not in ADAMW:
        raise ConfigError("task.adamw", task.adamw, "unknown AdamW implementation", list(ADAMW))
    return BenchOptions(steps=task.steps, warmup=task.warmup, batch_size=task.batch_size, seq_len=seq_len,
                        variants=tuple(task.variants), memory=task.memory, cold_compile=task.cold_compile,
                        compile_depths=tuple(task.compile_depths), threads=task.threads,
                        adamw=task.adamw, loss_chunk_tokens=task.loss_chunk_tokens)


MODES = ("train", "decode")


def decode_options(task: BenchTask, max_seq_len: int) -> DecodeOptions:
    for key in ("steps", "prompt_len", "new_tokens", "batch_size"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}", getattr(task, key), "must be at least 1", "an integer >= 1")
    if task.prompt_len + task.new_tokens > max_seq_len:
        raise ConfigError("task.new_tokens", task.new_tokens,
                          f"task.prompt_len={task.prompt_len} plus it passes model.max_seq_len={max_seq_len}",
                          f"at most {max_seq_len - task.prompt_len}")
    for key in ("decode_batch_sizes", "contexts"):
        values = list(getattr(task, key))
        if not values or any(v < 1 for v in values):
            raise ConfigError(f"task.{key}", values, "needs positive integers", "a non-empty list of integers >= 1")
    longest = max(task.contexts)
    if longest >= max_seq_len:
        raise ConfigError("task.contexts", list(task.contexts), f"{longest} is not below model.max_seq_len={max_seq_len}",
                          f"contexts below {max_seq_len}, or a larger model.max_seq_len")
    seq_len = task.seq_len if task.seq_len is not None else min(256, max_seq_len)
    if not 1 <= seq_len <= max_seq_len:
        raise ConfigError("task.seq_len", seq_len, f"must lie within model.max_seq_len={max_seq_len}",
                          f"1..{max_seq_len}")
    return DecodeOptions(prompt_len=task.prompt_len, new_tokens=task.new_tokens,
                         batch_sizes=tuple(task.decode_batch_sizes), prefill_batch=task.batch_size,
                         prefill_len=seq_len, contexts=tuple(task.contexts), steps=task.steps,
                         hf_static=task.hf_static)


def run_decode(cfg: DictConfig, task: BenchTask) -> dict[str, Any]:
    """`task.mode=decode`: the inference benchmark (llmarch_compose/bench/decode.py)."""
    import torch

    from ..bench.decode import render_decode_markdown, run_decode_benchmark, write_report
    from ..bench.harness import hf_peer
    from ..model.build import build

    spec = resolve_spec(cfg)
    options = decode_options(task, spec.model.max_seq_len)
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    device = resolve_device_of(cfg)
    preflight(spec, options.prefill_batch, options.prefill_len, precision.dtype, device)
    if task.threads is not None:
        if task.threads < 1:
            raise ConfigError("task.threads", task.threads, "must be at least 1", "an integer >= 1, or null")
        torch.set_num_threads(task.threads)
    out_dir = output_dir(task)
    torch.manual_seed(0)
    model = build(cfg, device=device, dtype=precision.dtype).eval()
    with tempfile.TemporaryDirectory(prefix="llmarch-bench-") as workdir:
        hf, why = hf_peer(model, cfg, Path(workdir), precision.dtype, device)
        if hf is not None:
            hf.eval()
        options.notes.append(f"peer: {why}")
        report = run_decode_benchmark(model, hf, options, device, precision.dtype)
    write_report(report, out_dir)
    print(render_decode_markdown(report), end="")
    print(f"outputs in {out_dir}")
    return report


@register("task", "bench", params=BenchTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task: BenchTask = to_dataclass(BenchTask, cfg.task, "task")
    if task.mode not in MODES:
        raise ConfigError("task.mode", task.mode, "unknown benchmark mode", MODES)
    if task.mode == "decode":
        return run_decode(cfg, task)
    spec = resolve_spec(cfg)
    options = options_for(task, spec.model.max_seq_len)
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    preflight(spec, options.batch_size, options.seq_len, precision.dtype, resolve_device_of(cfg))
    out_dir = output_dir(task)
    with tempfile.TemporaryDirectory(prefix="llmarch-bench-") as workdir:
        report = run_benchmark(cfg, options, Path(workdir))
    markdown = render_markdown(report)
    write_atomic(out_dir / "bench.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out_dir / "bench.md", markdown)
    print(markdown, end="")
    print(f"outputs in {out_dir}")
    return report


__all__ = ["BenchTask", "run"]
