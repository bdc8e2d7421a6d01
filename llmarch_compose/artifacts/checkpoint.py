"""Checkpoints: a folder with `model.safetensors` and the resolved `config.yaml`, and,
for a model trained with `data.tokenizer=...`, that tokenizer's files beside them
(llmarch_compose/artifacts/tokenizer.py), so text goes in and out as it was trained.

Writes are atomic (`atomic_folder`): everything goes to a temporary sibling folder,
is fsynced, and takes the target's place in one step (an atomic exchange with the
earlier checkpoint where the system has one) only once complete. A save that fails,
is interrupted or is killed at any point leaves the earlier checkpoint loadable
(`load_checkpoint` finds it, `published`); the next save removes what a killed one left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from ..model.build import build
from .atomic import atomic_folder, published
from .reading import read_yaml
from .tokenizer import copy_tokenizer
from ..config.scale import apply_scale

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def trained_tokenizer(cfg: DictConfig) -> Optional[str]:
    """The tokenizer folder the config's data was read with (`data.tokenizer`); None: bytes."""
    data = cfg.get("data")
    return data.get("tokenizer") if isinstance(data, DictConfig) else None


def save_checkpoint(model: nn.Module, cfg: DictConfig, path: Union[str, Path]) -> Path:
    path = Path(path)
    tokenizer = trained_tokenizer(cfg)
    with atomic_folder(path) as tmp:
        # save_model stores tied tensors once (safetensors refuses shared storage otherwise).
        save_model(model, str(tmp / WEIGHTS))
        # Scaled first: resolving a `scale=tiny` config alone would freeze the preset's full-size numbers.
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(apply_scale(cfg), resolve=True))
        if tokenizer:  # the data was read through it: its files travel with the weights
            copy_tokenizer(tokenizer, tmp)
    return path


def checkpoint_config(path: Union[str, Path]) -> tuple[Path, DictConfig]:
    """The folder a checkpoint's files are in (see `published`) and its config, without
    its weights (bounded, without aliases: a checkpoint may come from elsewhere)."""
    path = published(path)
    cfg = read_yaml(path / CONFIG)
    if cfg.model.get("path"):  # built from a Hugging Face folder once; the checkpoint's weights replace those
        cfg.model.path = None
    return path, cfg


def load_checkpoint(path: Union[str, Path], device: str = "cpu") -> tuple[DictConfig, nn.Module]:
    """The config and the model of a checkpoint folder (the complete one a killed save
    left, if it was killed between its renames); every tensor must match."""
    path, cfg = checkpoint_config(path)
    model = build(cfg, device=device)
    load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    return cfg, model
