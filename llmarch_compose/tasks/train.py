"""`task=train`: a byte-level language model trained on the embedded corpus.

AdamW with linear warm-up and cosine decay, gradient clipping, a progress bar
with loss and tokens/s, metrics as JSON lines plus a final summary in the run
directory, and a final checkpoint (safetensors + resolved config) written
atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import SI, DictConfig
from tqdm.auto import tqdm

from ..builder import build, resolve_device
from ..checkpoint import save_checkpoint
from ..compile_stage import compile_from_config
from .. import objectives
from ..cost import count_params
from ..data import ByteCorpus, DataConfig
from ..errors import ConfigError
from ..precision import PrecisionConfig
from ..schema import CompileConfig
from ..spec import resolve_spec
from ..typed import to_dataclass


@dataclass
class TrainTask:
    name: str = "train"
    steps: int = 200
    batch_size: int = 16
    seq_len: int = SI("${model.max_seq_len}")
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


def check(task: TrainTask, vocab_size: int, max_seq_len: int, data_vocab: int) -> None:
    for key in ("steps", "batch_size", "seq_len", "eval_every", "eval_batches"):
        if getattr(task, key) < 1:
            raise ConfigError(f"task.{key}", getattr(task, key), "must be at least 1", "an integer >= 1")
    if task.lr <= 0:
        raise ConfigError("task.lr", task.lr, "must be positive", "a number > 0")
    if task.seq_len > max_seq_len:
        raise ConfigError("task.seq_len", task.seq_len, f"exceeds model.max_seq_len={max_seq_len}",
                          f"1..{max_seq_len}")
    if vocab_size < data_vocab:
        raise ConfigError("model.vocab_size", vocab_size, f"the byte-level data needs {data_vocab} token ids",
                          f">= {data_vocab}")


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
    """AdamW; norms, biases and other vectors take no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": task.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=task.lr, betas=(task.beta1, task.beta2))


@torch.no_grad()
def evaluate(model, objective: str, vocab_size: int, data: ByteCorpus, task: TrainTask,
             device: torch.device, precision: PrecisionConfig) -> float:
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows (and masks) every time
    losses = []
    for _ in range(task.eval_batches):
        x, y = data.batch("val", task.batch_size, task.seq_len, generator)
        with precision.autocast(device):
            ce = objectives.loss(model, objective, x.to(device), y.to(device), vocab_size, generator)[1]
        losses.append(ce.item())
    return sum(losses) / len(losses)


def run(cfg: DictConfig) -> dict[str, Any]:
    task: TrainTask = to_dataclass(TrainTask, cfg.task, "task")
    data_cfg: DataConfig = to_dataclass(DataConfig, cfg.data, "data")
    precision: PrecisionConfig = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    precision.validate()
    spec = resolve_spec(cfg)
    data = ByteCorpus(data_cfg)
    check(task, spec.model.vocab_size, spec.model.max_seq_len, data.vocab_size)
    out_dir = output_dir(task)
    out_dir.mkdir(parents=True, exist_ok=True)

    device = resolve_device(cfg.device)
    # Each run is independent: in a sweep the jobs share this process, and the
    # graphs and guards of earlier jobs' models would count against Dynamo's
    # recompile limit (a hard error under fullgraph).
    torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    model = build(spec, device=device, dtype=precision.dtype)
    objective = getattr(model, "objective", "causal_lm")
    vocab = spec.model.vocab_size
    counts = count_params(model)
    model_fn = compile_from_config(model, to_dataclass(CompileConfig, cfg.compile, "compile"))
    optimizer = optimizer_for(model, task)
    balancers = [m for m in model.modules() if hasattr(m, "after_optimizer_step")]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, task))
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_per_step = task.batch_size * task.seq_len

    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")  # a reused output folder starts a fresh log
    history: list[dict[str, Any]] = []

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    start = time.perf_counter()
    initial_val = evaluate(model_fn, objective, vocab, data, task, device, precision)
    log({"step": 0, "val_loss": initial_val, "elapsed_s": time.perf_counter() - start})
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
            record["val_loss"] = evaluate(model_fn, objective, vocab, data, task, device, precision)
        log(record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
    bar.close()

    final_val = history[-1]["val_loss"]
    summary = {
        "model": spec.model.name,
        "components": spec.components,
        **counts,
        "steps": task.steps,
        "tokens_trained": task.steps * tokens_per_step,
        "initial_val_loss": initial_val,
        "final_train_loss": loss_value,
        "final_val_loss": final_val,
        "tokens_per_s": tokens_per_step * timed_steps / train_time if train_time else None,
        "wall_s": time.perf_counter() - start,
        "compile": cfg.compile.mode,
        "precision": precision.name,
        "device": str(device),
        "objective": objective,
        "task": asdict(task),
    }
    if task.checkpoint:
        summary["checkpoint"] = str(save_checkpoint(model, cfg, out_dir / "checkpoint"))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"held-out loss {initial_val:.3f} -> {final_val:.3f} after {task.steps} steps "
          f"({summary['tokens_per_s'] or 0:,.0f} tokens/s); outputs in {out_dir}")
    return summary


__all__ = ["TrainTask", "run", "lr_at"]
