"""Where `task=generate` and `task=eval` get their model and its text, decided from the
configs alone, before any weight is read:

- `task.checkpoint=<folder>`: one of our checkpoints (`task=train` writes `<run>/checkpoint`;
  the run folder itself is accepted too). Its own config describes the model; its text
  is bytes, or the tokenizer saved beside its weights when it was trained with
  `data.tokenizer=...`;
- `model=hf model.path=<folder>`: a Hugging Face folder, with the tokenizer it holds
  (else its text is read as bytes);
- any other composed config: random weights (for timing), its text bytes, or
  `data.tokenizer` when one is set.

The run's own settings (device, precision, compile, seed) always come from the command
line, not from the checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import DictConfig

from ..artifacts.atomic import published
from ..artifacts.checkpoint import CONFIG, WEIGHTS, checkpoint_config, load_checkpoint, trained_tokenizer
from ..artifacts.tokenizer import TOKENIZER_FILES, has_tokenizer
from ..config.spec import ModelSpec, resolve_spec
from ..errors import ConfigError
from ..model.build import build
from ..plugin import registry as plugins
from ..plugin.interfaces import PositionEncoding, Topology
from ..plugin.objectives import Objective
from ..train.data import load_tokenizer
from .text import ByteCodec, TokenizerCodec

CHECKPOINT, HF, RANDOM = "checkpoint", "hf", "random"
Codec = Union[ByteCodec, TokenizerCodec]


@dataclass
class ModelPlan:
    """A model to load: its config (the checkpoint's, the Hugging Face folder's, or the
    composed one), where its weights are, and the length it was trained at."""

    cfg: DictConfig
    spec: ModelSpec
    origin: str  # checkpoint | hf | random
    folder: Optional[Path]
    trained_seq_len: int

    @property
    def key(self) -> str:
        """The setting that chose the weights (what an error about them names)."""
        return {CHECKPOINT: "task.checkpoint", HF: "model.path"}.get(self.origin, "model")

    @property
    def objective(self) -> Objective:
        return plugins.get("topology", self.spec.params["topology"].plugin).cls.objective

    @property
    def topology(self) -> str:
        return self.spec.params["topology"].name

    def describe(self) -> str:
        if self.origin == RANDOM:
            return f"{self.spec.model.name} (random weights)"
        return f"{self.spec.model.name} from {self.folder}"

    def max_positions(self) -> Optional[int]:
        """The most positions the model's position tables hold (learned absolute positions);
        None where nothing bounds them (RoPE, ALiBi, relative buckets, sinusoids). Read from
        the model built on `meta`: no memory, no weights."""
        model = build(self.spec, device="meta")
        bounds = [m.max_positions for m in model.modules()
                  if isinstance(m, PositionEncoding) and getattr(m, "max_positions", None)]
        return min(bounds) if bounds else None


def _checkpoint_folder(checkpoint: str) -> Path:
    folder = published(Path(checkpoint).expanduser())
    if not folder.is_dir():
        raise ConfigError("task.checkpoint", checkpoint, "no such folder",
                          "a checkpoint folder written by task=train (<run folder>/checkpoint)")
    if not (folder / CONFIG).is_file() and (published(folder / "checkpoint") / CONFIG).is_file():
        folder = published(folder / "checkpoint")  # a run folder: its checkpoint
    missing = [name for name in (CONFIG, WEIGHTS) if not (folder / name).is_file()]
    if missing:
        raise ConfigError("task.checkpoint", checkpoint, f"is not a checkpoint folder (no {' or '.join(missing)})",
                          "a checkpoint folder written by task=train (<run folder>/checkpoint)")
    return folder


def run_settings(cfg: DictConfig):
    """(compile settings, precision, device) of an inference task's run, validated."""
    from ..config.structured import to_dataclass
    from ..model.build import resolve_device
    from ..model.compiler import CompileConfig
    from ..model.precision import PrecisionConfig

    compile_cfg = to_dataclass(CompileConfig, cfg.compile, "compile")
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    precision.validate()
    return compile_cfg, precision, resolve_device(cfg.device)


def plan_model(cfg: DictConfig, checkpoint: Optional[str]) -> ModelPlan:
    """The model `cfg` and `task.checkpoint` name, from their configs only."""
    if checkpoint:
        if cfg.model.get("path"):
            raise ConfigError("task.checkpoint", checkpoint, f"and model.path={cfg.model.path} both name weights",
                              "one of them: task.checkpoint=<our checkpoint> or model=hf model.path=<folder>")
        folder, model_cfg = checkpoint_config(_checkpoint_folder(checkpoint))
        spec = resolve_spec(model_cfg)
        task = model_cfg.get("task")
        trained = task.get("seq_len") if isinstance(task, DictConfig) and task.get("name") == "train" else None
        return ModelPlan(model_cfg, spec, CHECKPOINT, folder, int(trained or spec.model.max_seq_len))
    spec = resolve_spec(cfg)
    path = cfg.model.get("path")
    origin, folder = (HF, Path(path).expanduser()) if path else (RANDOM, None)
    return ModelPlan(cfg, spec, origin, folder, spec.model.max_seq_len)


def text_codec(plan: ModelPlan) -> Codec:
    """How the model reads and writes text; a checkpoint trained with a tokenizer it does
    not hold is refused, naming `task.checkpoint`."""
    if plan.origin == CHECKPOINT:
        if has_tokenizer(plan.folder):
            return TokenizerCodec(load_tokenizer(str(plan.folder), "task.checkpoint"), str(plan.folder))
        trained = trained_tokenizer(plan.cfg)
        if trained:
            raise ConfigError("task.checkpoint", str(plan.folder),
                              f"was trained with data.tokenizer={trained}, and holds no tokenizer files to read "
                              "text with", f"the tokenizer's files ({', '.join(TOKENIZER_FILES[:3])}, ...) "
                              f"copied into {plan.folder}, or a checkpoint of a byte-level model")
        return ByteCodec()
    if plan.origin == HF:
        if has_tokenizer(plan.folder):  # a Hugging Face model's prompts take its tokenizer's special tokens
            return TokenizerCodec(load_tokenizer(str(plan.folder), "model.path"), str(plan.folder),
                                  add_special_tokens=True)
        print(f"llmarch: note: {plan.folder} holds no tokenizer; its text is read and written as UTF-8 bytes",
              file=sys.stderr)
        return ByteCodec()
    tokenizer = trained_tokenizer(plan.cfg)
    return TokenizerCodec(load_tokenizer(tokenizer), tokenizer) if tokenizer else ByteCodec()


def load_model(plan: ModelPlan, device: torch.device, dtype: torch.dtype, seed: int) -> Topology:
    """The model with its weights (a checkpoint's, the Hugging Face folder's, or random
    ones drawn from `seed`), in eval mode."""
    if plan.origin == CHECKPOINT:
        _, model = load_checkpoint(plan.folder, device=str(device))
        model = model.to(dtype)
    else:
        torch.manual_seed(seed)
        model = build(plan.cfg, device=device, dtype=dtype)  # model.path: the folder's weights
    return model.eval()


def check_ids(key: str, ids: list[int], vocab_size: int, what: str) -> None:
    """Token ids the model has rows for, else a ConfigError naming `key`."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ConfigError(key, what, f"gives token id {bad[0]}, past model.vocab_size={vocab_size}",
                          f"text whose ids lie in 0..{vocab_size - 1} (a model whose vocabulary covers its text)")


__all__ = ["ModelPlan", "run_settings", "plan_model", "text_codec", "load_model", "check_ids", "CHECKPOINT", "HF", "RANDOM"]
