"""The training loop: AdamW with linear warm-up and cosine decay, gradient clipping, a
progress bar with loss and tokens/s, held-out evaluation, metrics as JSON lines and a
final summary (held-out exact-match accuracy where the data asks questions, the KV
cache per token, the peak memory) and checkpoint, written atomically.

`task=train` (llmarch_compose/tasks/train.py) reads its node and calls `train`.
"""

from __future__ import annotations

import json
import math
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..artifacts.atomic import write_atomic
from ..artifacts.checkpoint import save_checkpoint
from ..config.spec import ModelSpec
from ..errors import ConfigError
from ..model.build import build
from ..model.card import count_params, kv_cache
from ..model.compiler import CompileConfig, compile_from_config
from ..model.precision import PrecisionConfig
from ..plugin.interfaces import DataSource, Topology
from ..plugin.objectives import Objective
from .metrics import causal_scores


@dataclass
class TrainSettings:
    """The `task=train` node: the optimizer, the schedule, evaluation and outputs."""

    name: str = "train"
    steps: int = 200
    batch_size: int = 16
    seq_len: Optional[int] = None  # None: the data's own length (a synthetic problem's), else model.max_seq_len
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint: bool = True
    progress: bool = True
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)


def check(task: TrainSettings, vocab_size: int, max_seq_len: int, data: DataSource, data_name: str) -> None:
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}", getattr(task, key), "must be at least 1", "an integer >= 1")
    if task.lr <= 0:
        raise ConfigError("task.lr", task.lr, "must be positive", "a number > 0")
    if task.seq_len > max_seq_len:
        why = f" (data={data_name}'s problems are this long)" if task.seq_len == data.natural_seq_len else ""
        raise ConfigError("task.seq_len", task.seq_len, f"exceeds model.max_seq_len={max_seq_len}{why}",
                          f"1..{max_seq_len}")
    data.check_seq_len(task.seq_len)
    if vocab_size < data.vocab_size:
        raise ConfigError("model.vocab_size", vocab_size, f"data={data_name} needs {data.vocab_size} token ids",
                          f">= {data.vocab_size}")



def lr_at(step: int, task: TrainSettings) -> float:
    """Multiplier of task.lr: linear warm-up, then cosine decay to min_lr_ratio."""
    if step < task.warmup_steps:
        return (step + 1) / task.warmup_steps
    progress = (step - task.warmup_steps) / max(1, task.steps - task.warmup_steps)
    return task.min_lr_ratio + (1 - task.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))



def optimizer_for(model: torch.nn.Module, task: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; norms, biases and other vectors take no weight decay. The fused kernel
    (one pass over all parameters) where it runs: on CPU the default is a loop per
    parameter, about a fifth of an eager training step at the benchmark's shape."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.AdamW([{"params": decay, "weight_decay": task.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=task.lr, betas=(task.beta1, task.beta2), fused=fused or None)



class PeakMemory:
    """The run's peak memory. On a GPU, the caching allocator's peak (tensors only).
    On the CPU there is no allocator counter: the process's peak resident set
    (everything: interpreter, libraries, compiler), reset at the start of the run
    where Linux allows it, else counted from the start of the process (in a sweep
    run in one process, the earlier jobs' peaks included). `measure` says which."""

    PROC_STATUS, PROC_CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

    def __init__(self, device: torch.device):
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.measure = "cuda_max_memory_allocated"
        elif self._reset_resident_peak():
            self.measure = "process_peak_rss_since_run_start"
        else:
            self.measure = "process_peak_rss_since_process_start"

    def _reset_resident_peak(self) -> bool:
        try:
            self.PROC_CLEAR_REFS.write_text("5")  # Linux: resets VmHWM to the current resident set
            return self._resident_peak_kib() is not None
        except OSError:
            return False

    def _resident_peak_kib(self) -> Optional[int]:
        try:
            found = re.search(r"^VmHWM:\s+(\d+) kB", self.PROC_STATUS.read_text(), re.MULTILINE)
        except OSError:
            return None
        return int(found.group(1)) if found else None

    def bytes(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.measure == "process_peak_rss_since_run_start":
            return self._resident_peak_kib() * 1024
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux



@torch.no_grad()
def evaluate(model, objective: Objective, vocab_size: int, data: DataSource, task: TrainSettings,
             device: torch.device, precision: PrecisionConfig) -> dict[str, float]:
    """Held-out loss, and exact-match accuracy on the answers where the data has answers."""
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows (and masks) every time
    losses, counts = [], [0, 0, 0, 0]
    for _ in range(task.eval_batches):
        x, y = data.batch("val", task.batch_size, task.seq_len, generator)
        x, y = x.to(device), y.to(device)
        with precision.autocast(device):
            if data.has_accuracy:  # sources with answers train causal models only (see data.make_source)
                ce, batch_counts = causal_scores(model, x, y)
                counts = [a + b for a, b in zip(counts, batch_counts)]
            else:
                ce = objective.loss(model, x, y, vocab_size, generator)[1]
        losses.append(ce.item())
    result = {"val_loss": sum(losses) / len(losses)}
    if data.has_accuracy:
        tokens_right, tokens, rows_right, rows = counts
        result["val_accuracy"] = tokens_right / tokens
        result["val_sequence_accuracy"] = rows_right / rows
    return result


class MetricsLog:
    """metrics.jsonl in the run folder, one record a line, and the records in memory."""

    def __init__(self, path: Path):
        self.path = path
        self.records: list[dict[str, Any]] = []
        path.write_text("")  # a reused output folder starts a fresh log

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


@dataclass
class Run:
    """What one training run works with, built before the first step."""

    spec: ModelSpec
    task: TrainSettings
    data: DataSource
    data_name: str
    objective: Objective
    precision: PrecisionConfig
    device: torch.device
    model: Topology
    forward: Callable  # the compiled (or eager) model
    generator: torch.Generator

    @property
    def tokens_per_step(self) -> int:
        return self.task.batch_size * self.task.seq_len

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.forward, self.objective, self.spec.model.vocab_size, self.data, self.task,
                        self.device, self.precision)


@dataclass
class Throughput:
    """Tokens per second over the timed steps (the first pays for compilation)."""

    tokens_per_step: int
    seconds: float = 0.0
    steps: int = 0

    def add(self, step: int, dt: float) -> float:
        if step > 1:
            self.seconds += dt
            self.steps += 1
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else self.tokens_per_step / dt

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else None


def prepare(spec: ModelSpec, task: TrainSettings, data: DataSource, data_name: str, objective: Objective,
            precision: PrecisionConfig, compile_cfg: CompileConfig, device: torch.device, seed: int,
            data_seed: Optional[int]) -> Run:
    """The model built, compiled and seeded, and the data stream's generator."""
    torch.manual_seed(seed)
    model = build(spec, device=device, dtype=precision.dtype)
    forward = compile_from_config(model, compile_cfg)
    generator = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    return Run(spec, task, data, data_name, objective, precision, device, model, forward, generator)


def train_steps(run: Run, log: MetricsLog, start: float) -> tuple[float, Throughput]:
    """Every optimizer step, logged; returns the last training cross-entropy and the throughput."""
    task, model = run.task, run.model
    optimizer = optimizer_for(model, task)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, task))
    throughput = Throughput(run.tokens_per_step)
    loss_value = float("nan")
    bar = tqdm(range(1, task.steps + 1), desc="train", disable=not task.progress, dynamic_ncols=True)
    for step in bar:
        x, y = run.data.batch("train", task.batch_size, task.seq_len, run.generator)
        t0 = time.perf_counter()
        with run.precision.autocast(run.device):
            loss, ce = run.objective.loss(run.forward, x.to(run.device), y.to(run.device),
                                          run.spec.model.vocab_size, run.generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
        optimizer.step()
        scheduler.step()
        model.after_optimizer_step()  # e.g. DeepSeek-V3's auxiliary-loss-free expert balance
        loss_value = ce.item()
        tok_s = throughput.add(step, time.perf_counter() - t0)
        record = {"step": step, "train_loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - start}
        if step % task.eval_every == 0 or step == task.steps:
            record.update(run.evaluate())
        log(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
    bar.close()
    return loss_value, throughput


def summarize(run: Run, log: MetricsLog, final_train_loss: float, throughput: Throughput,
              memory: PeakMemory, counts: dict[str, int], compile_mode: str, start: float) -> dict[str, Any]:
    """The run's summary.json, as data."""
    initial, final, task = log.records[0], log.records[-1], run.task
    return {
        "model": run.spec.model.name,
        "components": run.spec.components,
        "data": run.data_name,
        **counts,
        "steps": task.steps,
        "seq_len": task.seq_len,
        "tokens_trained": task.steps * run.tokens_per_step,
        "initial_val_loss": initial["val_loss"],
        "final_train_loss": final_train_loss,
        "final_val_loss": final["val_loss"],
        # Exact match on the answers (synthetic data); null where the data asks no questions.
        "initial_val_accuracy": initial.get("val_accuracy"),
        "final_val_accuracy": final.get("val_accuracy"),
        "final_val_sequence_accuracy": final.get("val_sequence_accuracy"),
        "chance_accuracy": run.data.chance_accuracy,
        "tokens_per_s": throughput.tokens_per_s,
        "wall_s": time.perf_counter() - start,
        # In the dtype the weights were trained in.
        "kv_cache_bytes_per_token": kv_cache(run.model, run.precision.dtype.itemsize,
                                             task.seq_len)["kv_cache_bytes_per_token"],
        "peak_memory_bytes": memory.bytes(),
        "peak_memory_measure": memory.measure,
        "compile": compile_mode,
        "precision": run.precision.name,
        "device": str(run.device),
        "objective": run.objective.name,
        "task": asdict(task),
    }


def train(spec: ModelSpec, task: TrainSettings, data: DataSource, data_name: str, objective: Objective,
          precision: PrecisionConfig, compile_cfg: CompileConfig, device: torch.device, seed: int,
          data_seed: Optional[int], out_dir: Path, checkpoint_config: Optional[DictConfig]) -> dict[str, Any]:
    """Train the model `spec` describes and write metrics.jsonl, summary.json and (with
    `checkpoint_config`, the config saved beside the weights) a checkpoint in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory(device)
    run = prepare(spec, task, data, data_name, objective, precision, compile_cfg, device, seed, data_seed)
    counts = count_params(run.model)
    log = MetricsLog(out_dir / "metrics.jsonl")
    start = time.perf_counter()
    log({"step": 0, **run.evaluate(), "elapsed_s": time.perf_counter() - start})
    final_train_loss, throughput = train_steps(run, log, start)
    summary = summarize(run, log, final_train_loss, throughput, memory, counts, compile_cfg.mode, start)
    if checkpoint_config is not None:
        summary["checkpoint"] = str(save_checkpoint(run.model, checkpoint_config, out_dir / "checkpoint"))
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


__all__ = ["TrainSettings", "train", "lr_at", "evaluate", "optimizer_for", "check", "PeakMemory"]
