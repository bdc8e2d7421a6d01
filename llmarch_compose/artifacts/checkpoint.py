"""Checkpoints: a folder with `model.safetensors` and the resolved `config.yaml`.

Writes are atomic (`atomic_folder`): everything goes to a temporary sibling folder,
is fsynced, and takes the target's place in one step (an atomic exchange with the
earlier checkpoint where the system has one) only once complete. A save that fails,
is interrupted or is killed at any point leaves the earlier checkpoint loadable
(`load_checkpoint` finds it, `published`); the next save removes what a killed one left.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from ..model.build import build
from .atomic import atomic_folder, published
from .reading import read_yaml
from ..config.scale import apply_scale

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_checkpoint(model: nn.Module, cfg: DictConfig, path: Union[str, Path]) -> Path:
    path = Path(path)
    with atomic_folder(path) as tmp:
        # save_model stores tied tensors once (safetensors refuses shared storage otherwise).
        save_model(model, str(tmp / WEIGHTS))
        # Scaled first: resolving a `scale=tiny` config alone would freeze the preset's full-size numbers.
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(apply_scale(cfg), resolve=True))
    return path


def load_checkpoint(path: Union[str, Path], device: str = "cpu") -> tuple[DictConfig, nn.Module]:
    """The config and the model of a checkpoint folder (the complete one a killed save
    left, if it was killed between its renames); every tensor must match."""
    path = published(path)
    cfg = read_yaml(path / CONFIG)  # bounded, without aliases: a checkpoint may come from elsewhere
    if cfg.model.get("path"):  # built from a Hugging Face folder once; these weights replace those
        cfg.model.path = None
    model = build(cfg, device=device)
    load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    return cfg, model
