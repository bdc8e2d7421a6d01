"""Hugging Face checkpoints in and out: `from_hf` and `to_hf`.

A checkpoint is a folder with `config.json` and `*.safetensors` (one file or
shards with their index). Each model type (`model_type` in config.json) is one
`ModelType` in `llmarch_compose.interop.types`: how its config maps onto our
groups and `model.` numbers and back, and its tensor table as data. The
mechanism here is shared: reading and writing, fusing and splitting tensors,
and the checks that make a half-loaded model or a partial output impossible.
Each type also declares what its modeling code computes (`fit.Expresses`):
`to_hf` writes only a model that declaration covers, field by field, and only
when every tensor of the model has a place in the checkpoint; anything else is
refused by name rather than written as a checkpoint that computes otherwise.

transformers is never imported at run time; an in-memory transformers model is
accepted through its own `save_pretrained`, so the on-disk layout is the one
mapping that matters.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..artifacts.atomic import atomic_folder
from ..artifacts.checkpoint import trained_tokenizer
from ..artifacts.reading import read_json
from ..artifacts.tokenizer import TOKENIZER_FILES, copy_tokenizer, has_tokenizer
from ..config.compose import compose
from ..config.spec import resolve_spec
from ..errors import ConfigError
from ..model.build import build
from ..plugin import registry as plugins
from ..plugin.interfaces import ModelSource
from ..plugin.registry import add
from .fields import GENERIC, Reading, check_known, check_read
from .fit import ensure_fits
from .mapping import InteropError, ModelType, expand, override, to_ours, to_theirs
from .types import choose_type

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_NAME = "generation_config.json"
TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")  # config.json and model.* alike


# ------------------------------------------------------------------ reading and writing

def read_config(path: Union[str, Path]) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise InteropError(f"{path}: no config.json (a Hugging Face checkpoint folder holds config.json "
                           "and *.safetensors)")
    hf = read_json(file, error=InteropError)  # bounded: a folder from elsewhere may hold anything
    if not isinstance(hf, dict):
        raise InteropError(f"{file}: not a JSON object (a Hugging Face config.json is one)")
    return hf


def read_tensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, sharded or not."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        weight_map = read_json(index, error=InteropError).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InteropError(f"{index}: no weight_map object")
        files = sorted(set(str(v) for v in weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise InteropError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read: "
                           "convert them with transformers' save_pretrained(safe_serialization=True))")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        try:  # a truncated file, or a pickle under this name, is refused by safetensors' header check
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise InteropError(f"{file}: not a readable safetensors file ({exc})") from None
    return tensors


def config_overrides(hf: Mapping[str, Any], registry: Mapping[str, ModelType]) -> tuple[ModelType, list[str]]:
    model_type = hf.get("model_type")
    if model_type not in registry:
        raise ConfigError("model_type", model_type, "no mapping for this Hugging Face model type", sorted(registry))
    kind = registry[model_type]
    check_known(hf, kind.name, kind.fields, {name: other.fields for name, other in registry.items()
                                              if name != kind.name})
    # A field left out is the config class's default, as transformers reads it.
    reading = Reading({**kind.defaults, **hf})
    tokens = [override(f"model.{key}", reading[key]) for key in TOKENS if key in reading]
    ours = kind.overrides(reading)
    check_read(hf, reading, kind.name, kind.fields)
    return kind, [*ours, *tokens]


# ------------------------------------------------------------------ the public functions

def _registry() -> dict[str, ModelType]:
    return {name: info.target for name, info in plugins.entries("hf_model_type").items()}


def _check_and_load(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every parameter and persistent buffer filled with a tensor of its shape, or nothing changes."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise InteropError(f"the checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:3]}")
    if unexpected:
        raise InteropError(f"the mapping produced {len(unexpected)} tensor(s) the model has no place for, "
                           f"e.g. {unexpected[:3]}")
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise InteropError(f"tensor {name!r}: the checkpoint gives shape {tuple(tensor.shape)}, "
                               f"the model has {tuple(expected[name].shape)}")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def checkpoint_overrides(path: Union[str, Path]) -> list[str]:
    """Our overrides for the checkpoint folder `path`, keeping the path so that
    building loads its weights."""
    _, ours = config_overrides(read_config(path), _registry())
    return [*ours, override("model.path", str(Path(path).resolve()))]


def load_weights(model: nn.Module, spec: Any, path: Union[str, Path]) -> nn.Module:
    """Fill `model` (built from `spec`) with the tensors of the checkpoint at `path`."""
    kind, _ = config_overrides(read_config(path), _registry())
    theirs = kind.normalize(read_tensors(path))
    rules = expand(kind.tensors(spec), kind.stacks(spec), spec.model.n_experts)
    tensors, used = to_ours(theirs, rules, spec.model.n_experts)
    left = sorted(k for k in set(theirs) - used if not any(s in k for s in kind.ignore))
    if left:
        raise InteropError(f"the checkpoint has {len(left)} tensor(s) this mapping does not use, e.g. {left[:3]} "
                           f"(model_type {kind.name})")
    device = next(iter(model.state_dict().values())).device
    _check_and_load(model, {k: v.to(device) for k, v in tensors.items()})
    return model


def from_hf(path_or_model: Union[str, Path, nn.Module], overrides: Sequence[str] = (),
            device: str = "cpu") -> tuple[DictConfig, nn.Module]:
    """The composed config and the model, with every tensor loaded, of a Hugging Face
    checkpoint folder or an in-memory transformers model. Extra `overrides` apply on
    top of what the checkpoint's config says (they must not change tensor shapes)."""
    if isinstance(path_or_model, nn.Module):
        with tempfile.TemporaryDirectory() as tmp:
            path_or_model.save_pretrained(tmp)
            return from_hf(tmp, overrides, device)
    cfg = compose(overrides, described=checkpoint_overrides(path_or_model))
    return cfg, build(cfg, device=device)  # building from model.path loads every tensor


def to_hf(model: nn.Module, cfg: DictConfig, out_dir: Union[str, Path], model_type: Optional[str] = None,
          tokenizer: Union[str, Path, None] = None) -> Path:
    """Write `config.json`, `model.safetensors` (and `generation_config.json` when the model
    states token ids) that transformers loads with `from_pretrained` and computes with as
    ours does, and the tokenizer's files (see llmarch_compose/artifacts/tokenizer.py) from
    the folder `tokenizer`, by default the one the config's data was read with
    (`data.tokenizer`, if that folder still holds it), so the folder is a complete model. A model the type cannot express
    is refused naming the field, before anything is written; without `model_type`, the
    first type that fits is chosen (see `fit.guess`). The folder appears whole or not at all."""
    spec = resolve_spec(cfg)
    if tokenizer is None:  # the data's tokenizer, where its folder still holds it
        trained = trained_tokenizer(cfg)
        tokenizer = trained if trained and has_tokenizer(trained) else None
    elif not has_tokenizer(tokenizer):
        raise ConfigError("tokenizer", str(tokenizer), "holds no tokenizer files",
                          f"a folder with {', '.join(TOKENIZER_FILES[:3])}, ... (a tokenizer's save_pretrained)")
    registry = _registry()
    if model_type:
        if model_type not in registry:
            raise ConfigError("model_type", model_type, "no mapping for this Hugging Face model type",
                              sorted(registry))
        kind = registry[model_type]
        ensure_fits(spec, kind)
    else:
        kind = choose_type(spec)
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    rules = expand(kind.tensors(spec), kind.stacks(spec), spec.model.n_experts)
    theirs = to_theirs(ours, rules)
    tokens = {key: getattr(spec.model, key, None) for key in TOKENS}
    if tokens["decoder_start_token_id"] is None:  # unset: the type's own rule (T5 starts from its padding id)
        del tokens["decoder_start_token_id"]
    sizes: dict[str, int] = {}  # the weights' dtype as written: the one most of their elements have
    for t in theirs.values():
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            sizes[name] = sizes.get(name, 0) + t.numel()
    hf_config = {"architectures": [kind.architecture], "model_type": kind.name, **kind.hf_config(spec), **tokens}
    stray = sorted(k for k in hf_config if k not in kind.fields and k not in GENERIC)
    if stray:  # pragma: no cover - a mapping table bug: transformers would ignore the field
        raise InteropError(f"the {kind.name} mapping writes config fields its type does not have: {stray}")
    if sizes:  # "dtype" for transformers 5, "torch_dtype" for the readers before it
        hf_config["dtype"] = hf_config["torch_dtype"] = max(sizes, key=sizes.__getitem__)
    out = Path(out_dir)
    try:
        with atomic_folder(out, overwrite=False) as tmp:
            save_file(theirs, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
            stated = {k: v for k, v in tokens.items() if v is not None}
            if stated:
                (tmp / GENERATION_NAME).write_text(json.dumps(stated, indent=2) + "\n")
            if tokenizer is not None:
                copy_tokenizer(tokenizer, tmp)
    except FileExistsError:
        raise InteropError(f"{out} exists: choose a new folder (nothing is overwritten)") from None
    return out


class HuggingFaceFolder(ModelSource):
    """`model.path=<folder>`: a Hugging Face checkpoint (config.json and *.safetensors)."""

    def recognizes(self, path: Path) -> bool:
        return (path / "config.json").is_file()

    def overrides(self, path: Path) -> list[str]:
        return checkpoint_overrides(path)

    def load_weights(self, model: nn.Module, spec: Any, path: Path) -> None:
        load_weights(model, spec, path)


add("model_source", "hf", HuggingFaceFolder())
