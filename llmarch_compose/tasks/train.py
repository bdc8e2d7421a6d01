"""`task=train`: the composed model trained on the chosen data (`data=pydoc` by default).

AdamW with linear warm-up and cosine decay, gradient clipping, a progress bar
with loss and tokens/s, metrics as JSON lines plus a final summary in the run
directory (with held-out exact-match accuracy where the data asks questions, the
KV cache per token and the peak memory), and a final checkpoint (safetensors +
resolved config) written atomically.
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
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..model.build import build, resolve_device
from ..artifacts.checkpoint import save_checkpoint
from ..model.compiler import compile_from_config
from ..train import objectives
from ..plugin import registry as plugins
from ..model.card import count_params, kv_cache
from ..train.data import DataSource, data_config, make_source
from ..errors import ConfigError
from ..artifacts.atomic import write_atomic
from ..model.precision import PrecisionConfig
from ..config.schema import CompileConfig
from ..config.spec import resolve_spec
from ..config.structured import to_dataclass


@dataclass
class TrainTask:
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
    output_dir: Optional[str] = None  # None: Hydra's run directory (or the working directory)


ConfigStore.instance().store(group="task", name="train", node=TrainTask, provider="llmarch_compose")


def check(task: TrainTask, vocab_size: int, max_seq_len: int, data: DataSource, data_name: str) -> None:
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


def lr_at(step: int, task: TrainTask) -> float:
    """Multiplier of task.lr: linear warm-up, then cosine decay to min_lr_ratio."""
    if step < task.warmup_steps:
        return (step + 1) / task.warmup_steps
    progress = (step - task.warmup_steps) / max(1, task.steps - task.warmup_steps)
    return task.min_lr_ratio + (1 - task.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def output_dir(task: TrainTask) -> Path:
    if task.output_dir:
        return Path(task.output_dir)
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path.cwd()


def optimizer_for(model: torch.nn.Module, task: TrainTask) -> torch.optim.Optimizer:
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
def evaluate(model, objective: str, vocab_size: int, data: DataSource, task: TrainTask,
             device: torch.device, precision: PrecisionConfig) -> dict[str, float]:
    """Held-out loss, and exact-match accuracy on the answers where the data has answers."""
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows (and masks) every time
    losses, counts = [], [0, 0, 0, 0]
    for _ in range(task.eval_batches):
        x, y = data.batch("val", task.batch_size, task.seq_len, generator)
        x, y = x.to(device), y.to(device)
        with precision.autocast(device):
            if data.has_accuracy:  # synthetic tasks train causal models only (see data.make_source)
                ce, batch_counts = objectives.causal_scores(model, x, y)
                counts = [a + b for a, b in zip(counts, batch_counts)]
            else:
                ce = objectives.loss(model, objective, x, y, vocab_size, generator)[1]
        losses.append(ce.item())
    result = {"val_loss": sum(losses) / len(losses)}
    if data.has_accuracy:
        tokens_right, tokens, rows_right, rows = counts
        result["val_accuracy"] = tokens_right / tokens
        result["val_sequence_accuracy"] = rows_right / rows
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    task: TrainTask = to_dataclass(TrainTask, cfg.task, "task")
    data_cfg = data_config(cfg.data)
    precision: PrecisionConfig = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    precision.validate()
    spec = resolve_spec(cfg)
    topology = spec.params["topology"]
    objective = getattr(plugins.get("topology", topology.plugin).cls, "objective", "causal_lm")
    data = make_source(data_cfg, objective, topology.name)
    if task.seq_len is None:
        task.seq_len = data.natural_seq_len or spec.model.max_seq_len
    check(task, spec.model.vocab_size, spec.model.max_seq_len, data, data_cfg.name)
    out_dir = output_dir(task)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    # Each run is independent: in a sweep the jobs share this process, and the
    # graphs and guards of earlier jobs' models would count against Dynamo's
    # recompile limit (a hard error under fullgraph).
    torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    memory = PeakMemory(device)
    model = build(spec, device=device, dtype=precision.dtype)
    vocab = spec.model.vocab_size
    counts = count_params(model)
    model_fn = compile_from_config(model, to_dataclass(CompileConfig, cfg.compile, "compile"))
    optimizer = optimizer_for(model, task)
    balancers = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, task))
    generator = torch.Generator().manual_seed(cfg.seed if data_cfg.seed is None else data_cfg.seed)
    tokens_per_step = task.batch_size * task.seq_len

    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")  # a reused output folder starts a fresh log
    history: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    start = time.perf_counter()
    initial = evaluate(model_fn, objective, vocab, data, task, device, precision)
    log({"step": 0, **initial, "elapsed_s": time.perf_counter() - start})
    train_time, timed_steps, loss_value = 0.0, 0, float("nan")
    bar = tqdm(range(1, task.steps + 1), desc="train", disable=not task.progress, dynamic_ncols=True)
    for step in bar:
        x, y = data.batch("train", task.batch_size, task.seq_len, generator)
        t0 = time.perf_counter()
        with precision.autocast(device):
            loss, ce = objectives.loss(model_fn, objective, x.to(device), y.to(device), vocab, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip)
        optimizer.step()
        scheduler.step()
        for module in balancers:  # e.g. DeepSeek-V3's auxiliary-loss-free expert balance
            module.after_optimizer_step()
        loss_value = ce.item()
        dt = time.perf_counter() - t0
        if step > 1:  # the first step pays for compilation
            train_time += dt
            timed_steps += 1
        tok_s = tokens_per_step * timed_steps / train_time if train_time else tokens_per_step / dt
        record = {"step": step, "train_loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - start}
        if step % task.eval_every == 0 or step == task.steps:
            record.update(evaluate(model_fn, objective, vocab, data, task, device, precision))
        log(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
    bar.close()

    final = history[-1]
    initial_val, final_val = initial["val_loss"], final["val_loss"]
    summary = {
        "model": spec.model.name,
        "components": spec.components,
        "data": data_cfg.name,
        **counts,
        "steps": task.steps,
        "seq_len": task.seq_len,
        "tokens_trained": task.steps * tokens_per_step,
        "initial_val_loss": initial_val,
        "final_train_loss": loss_value,
        "final_val_loss": final_val,
        # Exact match on the answers (synthetic data); null where the data asks no questions.
        "initial_val_accuracy": initial.get("val_accuracy"),
        "final_val_accuracy": final.get("val_accuracy"),
        "final_val_sequence_accuracy": final.get("val_sequence_accuracy"),
        "chance_accuracy": getattr(data, "chance_accuracy", None),
        "tokens_per_s": tokens_per_step * timed_steps / train_time if train_time else None,
        "wall_s": time.perf_counter() - start,
        # In the dtype the weights were trained in.
        "kv_cache_bytes_per_token": kv_cache(model, precision.dtype.itemsize, task.seq_len)["kv_cache_bytes_per_token"],
        "peak_memory_bytes": memory.bytes(),
        "peak_memory_measure": memory.measure,
        "compile": cfg.compile.mode,
        "precision": precision.name,
        "device": str(device),
        "objective": objective,
        "task": asdict(task),
    }
    if task.checkpoint:
        summary["checkpoint"] = str(save_checkpoint(model, cfg, out_dir / "checkpoint"))
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    accuracy = f", answer accuracy {final['val_accuracy']:.1%}" if "val_accuracy" in final else ""
    print(f"held-out loss {initial_val:.3f} -> {final_val:.3f}{accuracy} after {task.steps} steps "
          f"({summary['tokens_per_s'] or 0:,.0f} tokens/s); outputs in {out_dir}")
    return summary


__all__ = ["TrainTask", "run", "lr_at"]
