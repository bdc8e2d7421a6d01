"""The training loop: AdamW with linear warm-up and cosine decay, gradient clipping, a
progress bar with loss and tokens/s, held-out evaluation, metrics as JSON lines and a
final summary (held-out exact-match accuracy where the data asks questions, the KV
cache per token, the peak memory) and checkpoint, written atomically.

What a failure leaves: hyper-parameters are checked before the first step; a
non-finite loss, gradient norm, held-out loss or weight stops the run
(`task.on_nonfinite=stop`) or skips that update (`skip`), and a diverged run
writes no checkpoint. summary.json is written whatever the ending, valid JSON
(null for non-finite figures) with a `status`: completed, diverged, interrupted
(Ctrl-C) or failed (an exception, re-raised after the summary is written).

`task=train` (llmarch_compose/tasks/train.py) reads its node and calls `train`.
"""

from __future__ import annotations

import json
import math
import os
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..artifacts.atomic import write_atomic
from ..artifacts.checkpoint import save_checkpoint
from ..config.spec import ModelSpec
from ..errors import ConfigError, LlmarchError
from ..model.build import build
from ..model.card import count_params, kv_cache
from ..model.compiler import CompileConfig, compile_from_config, compile_loss
from ..model.diagram import write_diagram
from ..model.precision import PrecisionConfig
from ..plugin.interfaces import DataSource, Topology
from ..plugin.objectives import Objective, full_cross_entropy
from .foreign_load import ForeignLoad
from .metrics import causal_scores
from . import chunked_loss, parallel, recompute, resume
from . import loggers as loggers_mod
from .parallel import SINGLE, World


@dataclass
class TrainSettings:
    """The `task=train` node: the optimizer, the schedule, evaluation and outputs."""

    name: str = "train"
    steps: int = 200
    batch_size: int = 16  # sequences per rank and micro-step; the global batch is this x ranks x grad_accum_steps
    grad_accum_steps: int = 1  # micro-steps whose gradients one optimizer step sums
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
    diagram: bool = True  # diagram.svg and diagram.png of the model beside the summary (about 0.4 s of CPU)
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)
    overwrite: bool = False  # replace the run an existing `output` holds (refused otherwise)
    on_nonfinite: str = "stop"  # a non-finite loss or gradient norm: stop the run, or skip the update
    checkpoint_every: int = 0  # write a checkpoint to resume from every K steps (0: none; see train/resume.py)
    keep_checkpoints: int = 2  # the newest M of them are kept
    loss_chunk_tokens: int = 0  # the LM head and loss over this many tokens at a time (0: the whole batch at once)
    activation_checkpointing: str = "none"  # none | full | selective: recompute block activations in the backward
    resume: Optional[str] = None  # auto (the newest checkpoint in the output, if any), a checkpoint folder, or null


NONFINITE_ACTIONS = ("stop", "skip")
#: The most steps, tokens per batch row or batches a count may name (2^40, about 10^12).
MAX_COUNT = 1 << 40
COMPLETED, DIVERGED, INTERRUPTED, FAILED = "completed", "diverged", "interrupted", "failed"
#: The files of a run in its folder; one that holds any of them holds a run.
SUMMARY, METRICS, CHECKPOINT = "summary.json", "metrics.jsonl", "checkpoint"


class TrainingDiverged(LlmarchError):
    """A non-finite figure at a step: the run stops and writes no checkpoint."""

    def __init__(self, step: int, what: str, value: float):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"training diverged at step {step}: {what}={value} (task.on_nonfinite=stop); no checkpoint "
                         "written. Lower task.lr or task.grad_clip, or set task.on_nonfinite=skip to skip such updates")


def _hyper(task: TrainSettings, key: str, ok: Callable[[float], bool], valid: str) -> None:
    value = getattr(task, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):  # NaN fails every `ok`
        raise ConfigError(f"task.{key}", value, f"must be {valid}", valid)


def check(task: TrainSettings, vocab_size: int, max_seq_len: int, data: DataSource, data_name: str) -> None:
    for key in ("steps", "batch_size", "grad_accum_steps", "seq_len", "eval_every", "eval_batches", "warmup_steps"):
        value, low = getattr(task, key), 0 if key == "warmup_steps" else 1
        if not low <= value <= MAX_COUNT:  # past it, counts overflow the int64 tensors they reach
            raise ConfigError(f"task.{key}", value, f"must be an integer in {low}..{MAX_COUNT}",
                              f"an integer >= {low}")
    if not 0 <= task.loss_chunk_tokens <= MAX_COUNT:
        raise ConfigError("task.loss_chunk_tokens", task.loss_chunk_tokens, f"must be an integer in 0..{MAX_COUNT}",
                          "0 (the whole batch's logits at once) or a number of tokens, e.g. 1024")
    if not 0 <= task.checkpoint_every <= MAX_COUNT:
        raise ConfigError("task.checkpoint_every", task.checkpoint_every, f"must be an integer in 0..{MAX_COUNT}",
                          "0 (no checkpoints to resume from) or a number of steps")
    if not 1 <= task.keep_checkpoints <= 10_000:
        raise ConfigError("task.keep_checkpoints", task.keep_checkpoints, "must be an integer in 1..10000",
                          "how many of the newest checkpoints to keep, e.g. 2")
    _hyper(task, "lr", lambda v: 0 < v < math.inf, "a finite number > 0")
    _hyper(task, "grad_clip", lambda v: v > 0, "a number > 0 (inf: no clipping)")
    _hyper(task, "weight_decay", lambda v: 0 <= v < math.inf, "a finite number >= 0")
    _hyper(task, "min_lr_ratio", lambda v: 0 <= v <= 1, "a number in [0, 1]")
    _hyper(task, "beta1", lambda v: 0 <= v < 1, "a number in [0, 1)")
    _hyper(task, "beta2", lambda v: 0 <= v < 1, "a number in [0, 1)")
    if task.activation_checkpointing not in recompute.MODES:
        raise ConfigError("task.activation_checkpointing", task.activation_checkpointing, "unknown mode",
                          recompute.MODES)
    if task.on_nonfinite not in NONFINITE_ACTIONS:
        raise ConfigError("task.on_nonfinite", task.on_nonfinite, "is not an action", NONFINITE_ACTIONS)
    if task.seq_len > max_seq_len:
        why = f" (data={data_name}'s problems are this long)" if task.seq_len == data.natural_seq_len else ""
        raise ConfigError("task.seq_len", task.seq_len, f"exceeds model.max_seq_len={max_seq_len}{why}",
                          f"1..{max_seq_len}")
    data.check_seq_len(task.seq_len)
    if vocab_size < data.vocab_size:
        raise ConfigError("model.vocab_size", vocab_size, f"data={data_name} needs {data.vocab_size} token ids",
                          f">= {data.vocab_size}")



def check_output(out_dir: Path, task: TrainSettings) -> None:
    """A folder that already holds a run (its summary, metrics or checkpoint) is not
    written into unless task.overwrite=true: two runs' files must never mix."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("task.output", str(out_dir), "is a file; a run writes a folder", "a folder's path")
    if task.overwrite or not out_dir.is_dir():
        return
    if task.resume is not None:  # continuing the run the folder holds (or, with auto and no checkpoint, redoing it)
        return
    found = [name for name in (SUMMARY, METRICS, CHECKPOINT, f".{CHECKPOINT}.old", resume.FOLDER)
             if (out_dir / name).exists()]
    if found:
        raise ConfigError("task.output", str(out_dir), f"already holds a run ({', '.join(found)})",
                          "a new folder, or task.overwrite=true to replace that run")


def finite_or_null(value: Any) -> Any:
    """`value` with every non-finite float (in dicts and lists too) replaced by None:
    JSON has no NaN or infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


def lr_at(step: int, task: TrainSettings) -> float:
    """Multiplier of task.lr: linear warm-up, then cosine decay to min_lr_ratio."""
    if step < task.warmup_steps:
        return (step + 1) / task.warmup_steps
    progress = (step - task.warmup_steps) / max(1, task.steps - task.warmup_steps)
    return task.min_lr_ratio + (1 - task.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))



def optimizer_for(model: torch.nn.Module, task: TrainSettings) -> torch.optim.Optimizer:
    """AdamW; norms, biases and other vectors take no weight decay (biases by name too: an
    MoE's stacked expert biases are 2-D). The fused kernel (one pass over all parameters)
    where it runs: on CPU the default is a loop per parameter, about a fifth of an eager
    training step at the benchmark's shape."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("bias")]
    no_decay = [p for n, p in named if p.dim() < 2 or n.endswith("bias")]
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
             device: torch.device, precision: PrecisionConfig, world: World = SINGLE) -> dict[str, float]:
    """Held-out loss, and exact-match accuracy on the answers where the data has answers.
    Each batch is `task.batch_size` rows per rank, every rank scoring its own rows."""
    generator = torch.Generator().manual_seed(1234)  # the same held-out windows (and masks) every time
    losses, counts = [], [0, 0, 0, 0]
    for _ in range(task.eval_batches):
        x, y = data.batch("val", task.batch_size * world.size, task.seq_len, generator)
        x, y = parallel.rank_rows(x, world).to(device), parallel.rank_rows(y, world).to(device)
        with precision.autocast(device):
            if data.has_accuracy:  # sources with answers train causal models only (see data.make_source)
                ce, batch_counts = causal_scores(model, x, y)
                counts = [a + b for a, b in zip(counts, batch_counts)]
            else:
                ce = objective.loss(model, x, y, vocab_size, generator)[1]
        losses.append(ce.detach().float())
    losses = parallel.mean_over_ranks(torch.stack(losses), world).tolist()
    counts = parallel.sum_over_ranks(torch.tensor(counts, dtype=torch.float64), world).tolist()
    result = {"val_loss": sum(losses) / len(losses)}
    if data.has_accuracy:
        tokens_right, tokens, rows_right, rows = counts
        result["val_accuracy"] = tokens_right / tokens
        result["val_sequence_accuracy"] = rows_right / rows
    return result


class MetricsLog:
    """metrics.jsonl in the run folder, one record a line, and the records in memory."""

    def __init__(self, path: Optional[Path], records: Optional[list[dict[str, Any]]] = None,
                 loggers: loggers_mod.Loggers = loggers_mod.NONE):
        self.path = path  # None: the records are kept in memory only (the ranks other than 0)
        self.records = list(records or [])
        self.loggers = loggers  # the `logger` group's choices, fed every new record
        if path is not None:  # a reused output folder starts a fresh log, a resumed run its own records
            write_atomic(path, "".join(to_json(r) + "\n" for r in self.records))

    @staticmethod
    def records_until(source: Path, step: int) -> list[dict[str, Any]]:
        """The records of a resumed run's log up to its checkpoint's `step` (those after it
        were written after the checkpoint, and are written again)."""
        lines = source.read_text().splitlines() if source.is_file() else []
        return [r for r in map(json.loads, filter(None, lines)) if isinstance(r, dict) and r.get("step", 0) <= step]

    def __call__(self, record: dict[str, Any]) -> None:
        if self.path is not None:  # the file first: `records` never holds a line the file lacks
            with open(self.path, "a") as f:
                f.write(to_json(record) + "\n")
        self.records.append(record)
        self.loggers.record(record)


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
    forward: Callable  # the compiled (or eager) model, what evaluation calls
    generator: torch.Generator
    world: World = SINGLE
    parallel: Any = None  # the `parallel` node (None: one process)
    step_forward: Optional[Callable] = None  # what a training step calls (DDP's wrapper); None: `forward`
    cross_entropy: Optional[Callable] = None  # the whole-logits loss, compiled with the model; None: eager

    @property
    def sequences_per_step(self) -> int:
        """The global batch: sequences per rank and micro-step x ranks x micro-steps."""
        return self.task.batch_size * self.world.size * self.task.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.sequences_per_step * self.task.seq_len

    def micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of one step. The global batch is drawn whole from the
        run's generator, which every rank advances alike, and sliced by micro-step and rank:
        N ranks at batch B, one rank at N*B and grad_accum_steps=N at B train on the same rows."""
        task = self.task
        x, y = self.data.batch("train", self.sequences_per_step, task.seq_len, self.generator)
        per_micro = task.batch_size * self.world.size
        return [(parallel.rank_rows(x[m * per_micro:(m + 1) * per_micro], self.world),
                 parallel.rank_rows(y[m * per_micro:(m + 1) * per_micro], self.world))
                for m in range(task.grad_accum_steps)]

    def evaluate(self) -> dict[str, float]:
        return evaluate(self.forward, self.objective, self.spec.model.vocab_size, self.data, self.task,
                        self.device, self.precision, self.world)


@dataclass
class Throughput:
    """Tokens per second over the timed steps (the first pays for compilation), and the
    CPU load other processes put on the machine meanwhile."""

    tokens_per_step: int
    seconds: float = 0.0
    steps: int = 0
    foreign: ForeignLoad = field(default_factory=ForeignLoad)

    def begin(self, step: int) -> None:
        if step > 1:
            self.foreign.begin()

    def add(self, step: int, dt: float) -> float:
        if step > 1:
            self.seconds += dt
            self.steps += 1
            self.foreign.end(dt)
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else self.tokens_per_step / dt

    @property
    def tokens_per_s(self) -> Optional[float]:
        return self.tokens_per_step * self.steps / self.seconds if self.seconds else None


def prepare(spec: ModelSpec, task: TrainSettings, data: DataSource, data_name: str, objective: Objective,
            precision: PrecisionConfig, compile_cfg: CompileConfig, device: torch.device, seed: int,
            data_seed: Optional[int], parallel_cfg: Any = None, world: World = SINGLE) -> Run:
    """The model built (equal on every rank: the same seed), spread over the ranks,
    compiled, and the data stream's generator."""
    name = parallel_cfg.name if parallel_cfg is not None else "none"
    if name in parallel.SHARDED and task.loss_chunk_tokens:
        raise ConfigError("task.loss_chunk_tokens", task.loss_chunk_tokens, f"cannot run under parallel={name} yet: "
                          "the chunked loss runs the LM head after the model's forward, when FSDP2 has resharded "
                          "its weights", ["0", "parallel=ddp", "parallel=none"])
    torch.manual_seed(seed)
    model = build(spec, device=device, dtype=precision.dtype)
    autocast = parallel.autocast_dtype(precision)
    if name in parallel.SHARDED:  # sharded in place, then compiled block by block (FSDP2's hooks stay outside the graphs)
        parallel.wrap(model, parallel_cfg, world, device, precision.dtype, autocast)
        forward = step_forward = compile_from_config(model, compile_cfg)
        recompute.apply(model, task.activation_checkpointing)
    else:
        forward = compile_from_config(model, compile_cfg)
        recompute.apply(model, task.activation_checkpointing)
        step_forward = parallel.wrap(forward, parallel_cfg, world, device, precision.dtype, autocast) \
            if parallel_cfg is not None else forward
    generator = torch.Generator().manual_seed(seed if data_seed is None else data_seed)
    return Run(spec, task, data, data_name, objective, precision, device, model, forward, generator, world,
               parallel_cfg, step_forward, compile_loss(full_cross_entropy, compile_cfg))


@dataclass
class Progress:
    """How far a run got: what its summary reports however it ended."""

    throughput: Throughput
    steps_done: int = 0
    skipped: int = 0  # updates skipped for a non-finite loss or gradient norm (task.on_nonfinite=skip)
    train_loss: float = float("nan")

    def state(self) -> dict[str, Any]:
        """As a resumable checkpoint stores it."""
        return finite_or_null({"steps_done": self.steps_done, "skipped": self.skipped, "train_loss": self.train_loss,
                               "timed_seconds": self.throughput.seconds, "timed_steps": self.throughput.steps,
                               "foreign_load": self.throughput.foreign.state()})

    def as_logged(self, records: list[dict[str, Any]]) -> None:
        """The figures of the steps the log holds. Ctrl-C can land between counting a step
        and writing its line; an interrupted run's summary then agrees with its log."""
        trained = [r for r in records if "train_loss" in r and "diverged" not in r]
        self.steps_done = trained[-1]["step"] if trained else 0
        self.train_loss = trained[-1]["train_loss"] if trained else float("nan")
        self.skipped = sum(bool(r.get("skipped")) for r in trained)

    def restore(self, state: dict[str, Any]) -> None:
        self.steps_done, self.skipped = int(state.get("steps_done", 0)), int(state.get("skipped", 0))
        loss = state.get("train_loss")
        self.train_loss = float("nan") if loss is None else float(loss)
        self.throughput.seconds = float(state.get("timed_seconds") or 0.0)
        self.throughput.steps = int(state.get("timed_steps") or 0)
        self.throughput.foreign.restore(state.get("foreign_load"))


def _first_nonfinite(figures: dict[str, float]) -> Optional[tuple[str, float]]:
    return next(((k, v) for k, v in figures.items() if not math.isfinite(v)), None)


def check_evaluation(step: int, record: dict[str, Any]) -> None:
    """A non-finite held-out loss: the weights themselves are broken, skipping cannot help."""
    if "val_loss" in record and not math.isfinite(record["val_loss"]):
        raise TrainingDiverged(step, "val_loss", record["val_loss"])


def check_weights(model: torch.nn.Module, step: int, world: World = SINGLE) -> None:
    """The last update is checked by no later loss: look at the weights before saving them
    (each rank its own shards; every rank stops if any found one)."""
    bad = next((name for name, param in model.named_parameters()
                if not bool(torch.isfinite(parallel.local_tensor(param)).all())), None)
    if parallel.any_rank(bad is not None, world):
        raise TrainingDiverged(step, f"weights ({bad or 'on another rank'})", float("nan"))


def accumulate_gradients(run: Run, optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """One step's gradients, summed over its micro-batches (each loss divided by their
    number) and, on the last, synchronized over the ranks; (cross-entropy, loss with its
    auxiliary terms), both averaged over micro-batches and ranks."""
    task = run.task
    optimizer.zero_grad(set_to_none=True)
    forward = run.step_forward or run.forward
    figures = torch.zeros(2, device=run.device)
    micro = run.micro_batches()
    for m, (x, y) in enumerate(micro):
        with parallel.gradient_sync(forward, sync=m == len(micro) - 1), \
                chunked_loss.deferred_head(run.model, task.loss_chunk_tokens) as cross_entropy:
            with run.precision.autocast(run.device):
                loss, ce = run.objective.loss(forward, x.to(run.device), y.to(run.device),
                                              run.spec.model.vocab_size, run.generator,
                                              cross_entropy or run.cross_entropy)
            (loss / len(micro)).backward()
        figures += torch.stack([ce.detach().float(), loss.detach().float()]) / len(micro)
    ce_value, loss_value = parallel.mean_over_ranks(figures, run.world).tolist()
    return ce_value, loss_value


def train_steps(run: Run, log: MetricsLog, start: float, progress: Progress, optimizer: torch.optim.Optimizer,
                scheduler: Any, out_dir: Path, first_step: int = 1) -> None:
    """Every optimizer step from `first_step`, logged in `progress` and `log`; a non-finite
    loss or gradient norm raises TrainingDiverged before the update (or skips it:
    task.on_nonfinite=skip); every task.checkpoint_every steps, a checkpoint to resume from."""
    task, model = run.task, run.model
    throughput = progress.throughput
    bar = tqdm(range(first_step, task.steps + 1), desc="train", initial=first_step - 1, total=task.steps,
               disable=not (task.progress and run.world.is_main), dynamic_ncols=True)
    for step in bar:
        throughput.begin(step)  # outside the timed window: reading the CPU counters is not the step's work
        t0 = time.perf_counter()
        loss_value, total_value = accumulate_gradients(run, optimizer)
        grad_norm = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), task.grad_clip))
        bad = _first_nonfinite({"train_loss": loss_value, "loss": total_value, "grad_norm": float(grad_norm)})
        if bad and task.on_nonfinite == "stop":
            progress.train_loss = loss_value
            log({"step": step, "train_loss": loss_value, "grad_norm": float(grad_norm), "diverged": bad[0],
                 "elapsed_s": time.perf_counter() - start})
            raise TrainingDiverged(step, *bad)
        if bad:
            optimizer.zero_grad(set_to_none=True)
            progress.skipped += 1
        else:
            optimizer.step()
            parallel.sum_counters(model, run.world)
            model.after_optimizer_step()  # e.g. DeepSeek-V3's auxiliary-loss-free expert balance
        scheduler.step()  # the schedule follows the step number, skipped or not
        progress.steps_done, progress.train_loss = step, loss_value
        tok_s = throughput.add(step, time.perf_counter() - t0)
        record = {"step": step, "train_loss": loss_value, "lr": scheduler.get_last_lr()[0],
                  "grad_norm": float(grad_norm), "tokens_per_s": tok_s, "elapsed_s": time.perf_counter() - start}
        if bad:
            record["skipped"] = True
        if step % task.eval_every == 0 or step == task.steps:
            record.update(run.evaluate())
        log(record)
        check_evaluation(step, record)
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tok_s:,.0f}")
        if task.checkpoint_every and step % task.checkpoint_every == 0:
            check_weights(model, step, run.world)  # a diverged model never replaces a good checkpoint
            resume.save(out_dir, step, model, optimizer, scheduler, run.generator, progress.state(),
                        task.keep_checkpoints, run.world)
    bar.close()


def summarize(run: Run, log: MetricsLog, progress: Progress, memory: PeakMemory, counts: dict[str, int],
              compile_mode: str, start: float, status: str = COMPLETED) -> dict[str, Any]:
    """The run's summary.json, as data; the figures so far for a run that did not complete
    (the final held-out figures are those of its last evaluation)."""
    task, throughput = run.task, progress.throughput
    evaluated = [r for r in log.records if "val_loss" in r]
    initial = log.records[0] if log.records and log.records[0]["step"] == 0 else {}
    final = evaluated[-1] if evaluated else {}
    return {
        "status": status,
        "model": run.spec.model.name,
        "components": run.spec.components,
        # model.match: the dimension set to meet a budget, the target and the remaining difference
        "match": run.spec.match.record() if run.spec.match is not None else None,
        "data": run.data_name,
        **counts,
        "steps": task.steps,
        "steps_completed": progress.steps_done,
        "skipped_steps": progress.skipped,
        "seq_len": task.seq_len,
        "tokens_trained": (progress.steps_done - progress.skipped) * run.tokens_per_step,
        "parallel": run.parallel.name if run.parallel is not None else "none",
        "world_size": run.world.size,
        "grad_accum_steps": task.grad_accum_steps,
        "global_batch_sequences": run.sequences_per_step,
        "global_batch_tokens": run.tokens_per_step,
        "initial_val_loss": initial.get("val_loss"),
        "final_train_loss": progress.train_loss,
        "final_val_loss": final.get("val_loss"),
        "final_val_step": final.get("step"),
        # Exact match on the answers (synthetic data); null where the data asks no questions.
        "initial_val_accuracy": initial.get("val_accuracy"),
        "final_val_accuracy": final.get("val_accuracy"),
        "final_val_sequence_accuracy": final.get("val_sequence_accuracy"),
        "chance_accuracy": run.data.chance_accuracy,
        "tokens_per_s": throughput.tokens_per_s,
        **throughput.foreign.summary(),  # foreign_cpu_load: how loaded the machine was meanwhile
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
          data_seed: Optional[int], out_dir: Path, checkpoint_config: Optional[DictConfig],
          parallel_cfg: Any = None, world: World = SINGLE, resume_from: Optional[Path] = None,
          open_loggers: Optional[Callable[[dict[str, Any], int], loggers_mod.Loggers]] = None,
          settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Train the model `spec` describes and write metrics.jsonl, summary.json and (with
    `checkpoint_config`, the config saved beside the weights) a checkpoint in `out_dir`.

    summary.json is written however the run ends, with its `status`; a diverged,
    interrupted or failed run raises after writing it and saves no checkpoint (an
    earlier run's, in a folder reused with task.overwrite=true, stays). Over several
    ranks, every rank trains and rank 0 alone writes. With `resume_from` (a checkpoint
    train/resume.py wrote), the run continues after its step. `open_loggers(card,
    first_step)` opens the `logger` group's choices (rank 0 only). `settings`, the run's values
    in effect (config/in_effect.py), are stored in the summary for the sweep report."""
    memory = PeakMemory(device)
    run = prepare(spec, task, data, data_name, objective, precision, compile_cfg, device, seed, data_seed,
                  parallel_cfg, world)
    counts = count_params(run.model)
    optimizer = optimizer_for(run.model, task)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, task))
    progress = Progress(Throughput(run.tokens_per_step))
    # Restored before anything is written: a checkpoint that does not fit leaves the folder as it was.
    resumed = resume.load(resume_from, run.model, optimizer, scheduler, run.generator) if resume_from else None
    if world.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(out_dir / SUMMARY):
            os.unlink(out_dir / SUMMARY)  # a replaced run's summary must not describe this run's partial log
        if task.diagram:
            draw_diagram(spec, out_dir)
    earlier = MetricsLog.records_until(resumed.folder.parent.parent / METRICS, resumed.step) if resumed else []
    card = {**counts, "kv_cache_bytes_per_token": kv_cache(run.model, precision.dtype.itemsize,
                                                            task.seq_len)["kv_cache_bytes_per_token"]}
    loggers = open_loggers(card, resumed.step + 1 if resumed else 1) if open_loggers and world.is_main \
        else loggers_mod.NONE
    log = MetricsLog(out_dir / METRICS if world.is_main else None, earlier, loggers)
    start = time.perf_counter()

    def write_summary(status: str, **extra: Any) -> dict[str, Any]:
        summary = {**summarize(run, log, progress, memory, counts, compile_cfg.mode, start, status), **extra}
        if settings is not None:
            summary["settings"] = settings
        if world.is_main:
            write_atomic(out_dir / SUMMARY, to_json(summary, indent=2) + "\n")
            log.loggers.close(finite_or_null(summary))
        return summary

    try:
        first_step = 1
        if resumed is not None:
            progress.restore(resumed.progress)
            first_step = resumed.step + 1
        else:
            log({"step": 0, **run.evaluate(), "elapsed_s": time.perf_counter() - start})
            check_evaluation(0, log.records[-1])
        train_steps(run, log, start, progress, optimizer, scheduler, out_dir, first_step)
        check_weights(run.model, progress.steps_done, world)
        checkpoint = None
        if checkpoint_config is not None:
            checkpoint = str(save_final_weights(run, checkpoint_config, out_dir / CHECKPOINT))
        return write_summary(COMPLETED, checkpoint=checkpoint)
    except TrainingDiverged as exc:
        _write_on_the_way_out(write_summary, DIVERGED, diverged_at_step=exc.step, error=str(exc), checkpoint=None)
        raise
    except KeyboardInterrupt:
        progress.as_logged(log.records)
        _write_on_the_way_out(write_summary, INTERRUPTED, checkpoint=None)
        raise
    except BaseException as exc:
        _write_on_the_way_out(write_summary, FAILED, error=f"{type(exc).__name__}: {exc}", checkpoint=None)
        raise


def save_final_weights(run: Run, cfg: DictConfig, path: Path) -> Path:
    """The trained model as one consolidated checkpoint, written by rank 0 (FSDP2's
    shards gathered to it first)."""
    if run.parallel is None or run.parallel.name not in parallel.SHARDED:
        if run.world.is_main:
            save_checkpoint(run.model, cfg, path)
        parallel.barrier(run.world)
        return path
    state = parallel.full_state_dict(run.model, run.world)
    if run.world.is_main:
        whole = build(run.spec, device="cpu", dtype=run.precision.dtype)
        whole.load_state_dict(state, strict=True)
        save_checkpoint(whole, cfg, path)
    parallel.barrier(run.world)
    return path


def draw_diagram(spec: ModelSpec, out_dir: Path) -> None:
    """diagram.svg and diagram.png of the model, beside the summary (model/diagram.py). A
    drawing that fails is reported and the run goes on: nothing in it depends on the picture."""
    try:
        write_diagram(spec, out_dir)
    except Exception as exc:  # noqa: BLE001 - any failure of the drawing, named on stderr
        print(f"llmarch: could not draw the diagram: {type(exc).__name__}: {exc}", file=sys.stderr)


def _write_on_the_way_out(write_summary: Callable[..., dict[str, Any]], status: str, **extra: Any) -> None:
    """The summary of a run that did not complete; failing to write it must not hide
    why the run ended."""
    try:
        write_summary(status, **extra)
    except Exception as exc:  # noqa: BLE001 - the run's own error is the one to raise
        print(f"llmarch: could not write summary.json ({status}): {exc}", file=sys.stderr)


__all__ = ["TrainSettings", "TrainingDiverged", "train", "lr_at", "evaluate", "optimizer_for", "check",
           "check_output", "PeakMemory", "finite_or_null", "to_json"]
