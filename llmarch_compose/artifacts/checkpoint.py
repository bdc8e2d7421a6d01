"""Checkpoints: a folder with `model.safetensors` and the resolved `config.yaml`, and,
for a model trained with `data.tokenizer=...`, that tokenizer's files beside them
(llmarch_compose/artifacts/tokenizer.py), so text goes in and out as it was trained.

Writes are atomic (`atomic_folder`): everything goes to a temporary sibling folder,
is fsynced, and takes the target's place in one step (an atomic exchange with the
earlier checkpoint where the system has one) only once complete. A save that fails,
is interrupted or is killed at any point leaves the earlier checkpoint loadable
(`load_checkpoint` finds it, `published`); the next save removes what a killed one left.

`checksums.json` holds the SHA-256 of every stored tensor's bytes. Loading checks them,
and both saving and loading refuse non-finite weights, so a flipped bit, a NaN or a
truncated file is an error that names the file and the tensor, never a model that
quietly computes something else. (A checkpoint written before checksums were saved
loads without that check.)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from ..model.build import build
from .atomic import atomic_folder, published
from ..errors import LlmarchError
from .reading import read_json, read_yaml
from .tokenizer import copy_tokenizer
from ..config.scale import apply_scale

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
CHECKSUMS = "checksums.json"


class CheckpointError(LlmarchError):
    """A checkpoint folder whose files do not hold the model they describe; names the file and tensor."""


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy()).hexdigest()


def _stored_tensors(file: Path):
    """(name, tensor) of every tensor stored in `file`, or a CheckpointError naming it."""
    try:  # a truncated file, or another format under this name, fails safetensors' header check
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def _checksums(file: Path) -> dict[str, str]:
    """name -> SHA-256 of every tensor in `file`; a non-finite tensor is a CheckpointError."""
    sums = {}
    for name, tensor in _stored_tensors(file):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{file}: tensor {name!r} holds NaN or infinite values")
        sums[name] = _digest(tensor)
    return sums


def _verify(folder: Path) -> None:
    """Every stored tensor is finite and, where the folder has `checksums.json`, holds the
    bytes that were saved: a CheckpointError names the file and the first tensor that does not."""
    file, sums_file = folder / WEIGHTS, folder / CHECKSUMS
    found = _checksums(file)
    if not sums_file.is_file():
        return
    expected = read_json(sums_file, error=CheckpointError)
    if not isinstance(expected, dict):
        raise CheckpointError(f"{sums_file}: not a JSON object of tensor name -> SHA-256")
    for name, digest in found.items():
        if name not in expected:
            raise CheckpointError(f"{file}: tensor {name!r} is not in {CHECKSUMS}: the files come from two saves")
        if digest != expected[name]:
            raise CheckpointError(f"{file}: tensor {name!r} does not hold the bytes that were saved "
                                  f"(its SHA-256 differs from {CHECKSUMS}): the file is corrupt")
    if set(expected) - set(found):
        raise CheckpointError(f"{file}: lacks tensor(s) {sorted(set(expected) - set(found))[:3]} listed in {CHECKSUMS}")


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
        # Read back from the file: what is hashed is what was written (and NaN weights never publish).
        (tmp / CHECKSUMS).write_text(json.dumps(_checksums(tmp / WEIGHTS), indent=1, sort_keys=True))
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
    left, if it was killed between its renames); every tensor must be there, finite, of
    its parameter's shape, and hold the bytes that were saved (a CheckpointError otherwise)."""
    path, cfg = checkpoint_config(path)
    _verify(path)
    model = build(cfg, device=device)
    try:
        load_model(model, str(path / WEIGHTS), strict=True, device=str(device))
    except RuntimeError as exc:  # missing, unexpected or misshapen tensors: safetensors lists them
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"{path / WEIGHTS}: does not hold the model {path / CONFIG} describes: "
                              + (detail if len(detail) <= 600 else detail[:600] + " ...")) from None
    return cfg, model
