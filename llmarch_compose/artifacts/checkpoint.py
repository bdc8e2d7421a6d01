"""Checkpoints: a folder with `model.safetensors` and the resolved `config.yaml`.

Writes are atomic: everything goes to a temporary sibling folder that replaces
the target only once complete, so a failed or interrupted save never leaves a
half-written or corrupted checkpoint behind, and an earlier one survives.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model
from torch import nn

from ..model.build import build
from .atomic import umask
from ..config.scale import apply_scale

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"


def save_checkpoint(model: nn.Module, cfg: DictConfig, path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old = path.with_name(f".{path.name}.old")
    moved_old = False
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private; a checkpoint is not
        # save_model stores tied tensors once (safetensors refuses shared storage otherwise).
        save_model(model, str(tmp / WEIGHTS))
        # Scaled first: resolving a `scale=tiny` config alone would freeze the preset's full-size numbers.
        (tmp / CONFIG).write_text(OmegaConf.to_yaml(apply_scale(cfg), resolve=True))
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            moved_old = True
        os.replace(tmp, path)
    except BaseException:
        if moved_old and not path.exists():
            os.replace(old, path)  # put the previous checkpoint back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if moved_old:
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Union[str, Path], device: str = "cpu") -> tuple[DictConfig, nn.Module]:
    """The config and the model of a checkpoint folder; every tensor must match."""
    path = Path(path)
    cfg = OmegaConf.load(path / CONFIG)
    if cfg.model.get("path"):  # built from a Hugging Face folder once; these weights replace those
        cfg.model.path = None
    model = build(cfg, device=device)
    load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    return cfg, model
