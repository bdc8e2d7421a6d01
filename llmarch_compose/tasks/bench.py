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

from ..bench.harness import ADAMW, VARIANTS, BenchOptions, render_markdown, resolve_device_of, run_benchmark
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
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    memory: bool = True  # peak memory of a training step per variant
    cold_compile: bool = True  # compile time with an empty inductor cache, in a fresh process
    compile_depths: List[int] = field(default_factory=list)  # also cold-compile at these depths
    threads: Optional[int] = None  # torch.set_num_threads; None: as found
    adamw: str = "fused"  # fused | foreach | for_loop (the same for every variant)
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)


def options_for(task: BenchTask, max_seq_len: int) -> BenchOptions:
    for key, least in (("steps", 1), ("warmup", 1), ("batch_size", 1)):
        if getattr(task, key) < least:
            raise ConfigError(f"task.{key}", getattr(task, key), f"must be at least {least}", f"an integer >= {least}")
    seq_len = task.seq_len if task.seq_len is not None else max_seq_len
    if not 1 <= seq_len <= max_seq_len:
        raise ConfigError("task.seq_len", seq_len, f"must lie within model.max_seq_len={max_seq_len}",
                          f"1..{max_seq_len}")
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
                        adamw=task.adamw)


@register("task", "bench", params=BenchTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task: BenchTask = to_dataclass(BenchTask, cfg.task, "task")
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
