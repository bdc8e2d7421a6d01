"""`task=eval`: the perplexity of a model on a text, at one or more context lengths; in
nats per token (and bits per byte for byte-level models), on a text file, a folder of
them, or the held-out split of its data, written as eval.json, eval.md and eval.png.

    llmarch task=eval task.checkpoint=<folder> task.context_lengths=[128,256,512,1024,2048]

The model is a checkpoint of ours (`task.checkpoint`), a Hugging Face folder (`model=hf
model.path=...`) or a composed config (random weights). Without `task.path` the text is
the held-out split of the data the model was trained on (a checkpoint's own `data`
node; otherwise the composed one). Lengths past the training length are evaluated where
the model's positions reach (RoPE, ALiBi, relative buckets, sinusoids); a length past a
learned position table is a refused row of the report, with its reason, and the other
lengths are still measured (see llmarch_compose/inference/perplexity.py for the windows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ..artifacts.atomic import write_atomic
from ..config.structured import to_dataclass
from ..errors import ConfigError
from ..inference.loading import run_settings, CHECKPOINT, ModelPlan, load_model, plan_model, text_codec
from ..inference.perplexity import OK, evaluate_lengths, plan_lengths, plot_png, render_markdown
from ..inference.text import ByteCodec
from ..model.compiler import compile_from_config
from ..plugin import registry as plugins
from ..plugin.registry import register
from ..train.data import TextConfig, as_bytes, data_config, make_source, text_files
from ..train.loop import to_json
from .train import output_dir

JSON, MARKDOWN, PLOT = "eval.json", "eval.md", "eval.png"


@dataclass
class EvalTask:
    name: str = "eval"
    checkpoint: Optional[str] = None  # one of our checkpoint folders; None: model=hf model.path=..., or random weights
    path: Optional[str] = None  # a text file, or a folder searched with `glob`; None: the held-out split of the data
    glob: str = "**/*.txt"
    context_lengths: Optional[List[int]] = None  # None: the length the model was trained at
    max_windows: int = 32  # non-overlapping windows per context length, at most
    batch_size: int = 8
    progress: bool = True
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)


def check_settings(task: EvalTask) -> None:
    for key in ("max_windows", "batch_size"):
        value = getattr(task, key)
        if isinstance(value, bool) or value < 1:
            raise ConfigError(f"task.{key}", value, "must be at least 1", "an integer >= 1")
    lengths = task.context_lengths
    if lengths is None:
        return
    if not lengths:
        raise ConfigError("task.context_lengths", [], "names no length", "a list of integers >= 1, e.g. [128,256,512]")
    for length in lengths:
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ConfigError("task.context_lengths", list(lengths), f"{length!r} is not a length",
                              "a list of integers >= 1, e.g. [128,256,512]")
    repeated = sorted({n for n in lengths if list(lengths).count(n) > 1})
    if repeated:
        raise ConfigError("task.context_lengths", list(lengths), f"repeats {repeated[0]}", "each length once")


def _causal_topologies() -> list[str]:
    return sorted(name for name, info in plugins.entries("topology").items()
                  if getattr(getattr(info, "cls", None), "objective", None) is not None and info.cls.objective.causal)


def _files_stream(task: EvalTask, codec) -> tuple[torch.Tensor, str]:
    try:
        files = text_files(TextConfig(path=task.path, glob=task.glob))
    except ConfigError as exc:  # the same checks as data=text's, named by this task's keys
        raise ConfigError(exc.key.replace("data.", "task."), exc.value, exc.problem, exc.valid) from None
    label = task.path if len(files) == 1 else f"{task.path} ({len(files)} files)"
    if isinstance(codec, ByteCodec):
        return as_bytes(b"\n\n".join(p.read_bytes() for p in files)), label
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    return torch.tensor(codec.encode(text, add_special_tokens=False), dtype=torch.long), label


def _held_out_stream(plan: ModelPlan, codec) -> tuple[torch.Tensor, str]:
    node = OmegaConf.create(OmegaConf.to_container(plan.cfg.data, resolve=True))
    tokenized = not isinstance(codec, ByteCodec)
    if tokenized and node.get("tokenizer"):
        node.tokenizer = codec.folder  # a checkpoint's own copy of the tokenizer it was trained with
    try:
        source = make_source(data_config(node), plan.objective, plan.topology)
    except ConfigError as exc:
        if plan.origin != CHECKPOINT:
            raise
        raise ConfigError(exc.key, exc.value, f"{exc.problem.rstrip('.')} (the data the checkpoint was trained "
                          "on; task.path names another text)", exc.valid) from None
    splits = getattr(source, "splits", None)
    if not isinstance(splits, dict) or "val" not in splits:
        raise ConfigError("data", node.name, "holds no text to measure perplexity on (a synthetic task)",
                          "task.path=<a text file or folder>, or a model trained on data=pydoc or data=text")
    stream = splits["val"]
    if tokenized and not node.get("tokenizer"):  # bytes of text, for a model that reads a tokenizer's ids
        text = bytes(stream.tolist()).decode("utf-8", errors="replace")
        stream = torch.tensor(codec.encode(text, add_special_tokens=False), dtype=torch.long)
    where = f", {node.path}" if node.get("path") else ""
    return stream, f"the held-out split of data={node.name}{where}"


def token_stream(task: EvalTask, plan: ModelPlan, codec) -> tuple[torch.Tensor, str]:
    stream, label = _files_stream(task, codec) if task.path else _held_out_stream(plan, codec)
    vocab = plan.spec.model.vocab_size
    if len(stream) and int(stream.max()) >= vocab:
        raise ConfigError("task.path" if task.path else "data", task.path or plan.cfg.data.name,
                          f"the text has token id {int(stream.max())}, past model.vocab_size={vocab}",
                          "a text the model's vocabulary covers")
    if len(stream) < 2:
        raise ConfigError("task.path" if task.path else "data", task.path or plan.cfg.data.name,
                          f"holds {len(stream)} token(s): nothing to predict", "a text of at least two tokens")
    return stream, label


@register("task", "eval", params=EvalTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task: EvalTask = to_dataclass(EvalTask, cfg.task, "task")
    check_settings(task)
    compile_cfg, precision, device = run_settings(cfg)
    plan = plan_model(cfg, task.checkpoint)
    if not plan.objective.causal:
        raise ConfigError("topology", plan.topology, f"perplexity here is left to right, and this topology trains "
                          f"with {plan.objective.name}", _causal_topologies())
    lengths = sorted(task.context_lengths or [plan.trained_seq_len])
    codec = text_codec(plan)
    stream, label = token_stream(task, plan, codec)
    max_positions = plan.max_positions()
    plans = plan_lengths(lengths, len(stream), task.max_windows, max_positions)
    if all(p.reason for p in plans):
        most = min(len(stream) - 1, max_positions or len(stream))
        raise ConfigError("task.context_lengths", lengths, "no length can be evaluated: "
                          + "; ".join(f"{p.length}: {p.reason}" for p in plans), f"lengths of at most {most}")

    model = load_model(plan, device, precision.dtype, cfg.seed)
    forward = compile_from_config(model, compile_cfg)
    bar = tqdm(total=sum(p.windows for p in plans), desc="eval", unit="window", disable=not task.progress,
               dynamic_ncols=True)

    def on_batch(length: int, windows: int) -> None:
        bar.set_postfix(context=length)
        bar.update(windows)

    try:
        rows = evaluate_lengths(forward, stream, plans, task.batch_size, device, codec.byte_level,
                                static_batches=compile_cfg.mode != "eager",
                                autocast=lambda: precision.autocast(device), on_batch=on_batch)
    finally:
        bar.close()
    report = {
        "model": plan.describe(), "source": plan.origin, "checkpoint": str(plan.folder) if plan.folder else None,
        "text": label, "text_codec": codec.name, "byte_level": codec.byte_level, "stream_tokens": len(stream),
        "trained_seq_len": plan.trained_seq_len, "max_seq_len": plan.spec.model.max_seq_len,
        "position": plan.spec.components["position"], "max_positions": max_positions,
        "max_windows": task.max_windows, "batch_size": task.batch_size, "compile": compile_cfg.mode,
        "precision": precision.name, "device": str(device), "rows": rows,
    }
    markdown = render_markdown(report)
    out_dir = output_dir(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / JSON, to_json(report, indent=2) + "\n")
    write_atomic(out_dir / MARKDOWN, markdown)
    png = plot_png(report)
    if png is not None:
        write_atomic(out_dir / PLOT, png)
    print(markdown, end="")
    print(f"outputs in {out_dir}")
    return report


__all__ = ["EvalTask", "run", "JSON", "MARKDOWN", "PLOT", "OK"]
