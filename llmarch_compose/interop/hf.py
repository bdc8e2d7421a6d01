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
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, LlmarchError
from ..plugin.interfaces import ModelSource
from ..plugin.registry import add
from .fit import Expresses, ensure_fits

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GENERATION_NAME = "generation_config.json"
TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id")  # config.json fields, model.* fields alike


class InteropError(LlmarchError):
    """A checkpoint that cannot be represented, loaded or written; names the tensor or field."""


@dataclass(frozen=True)
class TensorRule:
    """How one of our tensors is made of checkpoint tensors.

    `theirs` holds one or more names (`{i}`: layer, `{e}`: expert). `join`:
    - copy: one tensor as is;
    - cat: several concatenated along dim 0 (fused q|k|v, gate|up);
    - t: one transposed (GPT-2's Conv1D stores [in, out]);
    - row: one [1, n] tensor held as our [n] (BART's final_logits_bias);
    - experts: per-expert tensors (each `cat` of `theirs`) stacked and transposed to
      our [experts, in, out] layout.
    """

    ours: str
    theirs: tuple[str, ...]
    join: str = "copy"
    sizes: tuple[int, ...] = ()  # dim-0 sizes of the parts, for splitting a fused tensor back

    def names(self, **index: int) -> tuple[str, tuple[str, ...]]:
        return self.ours.format(**index), tuple(t.format(**index) for t in self.theirs)


@dataclass(frozen=True)
class ModelType:
    """One Hugging Face model type: config both ways and the tensor table."""

    name: str
    architecture: str  # the class name config.json lists under "architectures"
    overrides: Callable[[Mapping[str, Any]], list[str]]  # HF config -> our overrides
    hf_config: Callable[[Any], dict[str, Any]]  # our ModelSpec -> HF config fields
    tensors: Callable[[Any], list[TensorRule]]  # our ModelSpec -> the tensor table
    # Checkpoint tensors that carry nothing we need (buffers a framework stores).
    ignore: tuple[str, ...] = ()
    stacks: Callable[[Any], dict[str, int]] = field(default=lambda spec: {"i": spec.model.n_layers})
    # Older spellings of checkpoint names, rewritten before matching: (old part, new part).
    renames: tuple[tuple[str, str], ...] = ()
    # The base model's prefix (GPT-2's "transformer."), which some uploads omit.
    prefix: str = ""
    # What the type's modeling code computes (see `fit`): to_hf writes nothing else.
    expresses: Optional[Expresses] = None
    # The transformers config class's defaults, for config.json files that leave a field out.
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def normalize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names as the tensor table spells them."""
        out = {}
        for name, tensor in tensors.items():
            for old, new in self.renames:
                name = name.replace(old, new)
            out[name] = tensor
        if self.prefix and not any(k.startswith(self.prefix) for k in out):
            out = {(k if k.startswith("lm_head") else self.prefix + k): v for k, v in out.items()}
        return out


# ------------------------------------------------------------------ reading and writing

def read_config(path: Union[str, Path]) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise InteropError(f"{path}: no config.json (a Hugging Face checkpoint folder holds config.json "
                           "and *.safetensors)")
    return json.loads(file.read_text())


def read_tensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, sharded or not."""
    path = Path(path)
    index = path / INDEX_NAME
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise InteropError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read: "
                           "convert them with transformers' save_pretrained(safe_serialization=True))")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def config_overrides(hf: Mapping[str, Any], registry: Mapping[str, ModelType]) -> tuple[ModelType, list[str]]:
    model_type = hf.get("model_type")
    if model_type not in registry:
        raise ConfigError("model_type", model_type, "no mapping for this Hugging Face model type", sorted(registry))
    kind = registry[model_type]
    hf = {**kind.defaults, **hf}  # a field left out is the config class's default, as transformers reads it
    tokens = [override(f"model.{key}", hf[key]) for key in TOKENS if key in hf]
    return kind, [*kind.overrides(hf), *tokens]


def override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar (nested dicts and lists included)."""
    return f"{key}={_literal(value)}"


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as an override")


# ------------------------------------------------------------------ tensors both ways

def _expand(rules: Iterable[TensorRule], stacks: Mapping[str, int], n_experts: int) -> list[TensorRule]:
    """Rules with their `{i}` (and per-stack indices) filled in; `{e}` stays for `experts`."""
    out = []
    for rule in rules:
        fields = {f for f in stacks if "{" + f + "}" in rule.ours}
        if not fields:
            out.append(rule)
            continue
        (name,) = fields
        for i in range(stacks[name]):
            out.append(TensorRule(rule.ours.replace("{" + name + "}", str(i)),
                                  tuple(t.replace("{" + name + "}", str(i)) for t in rule.theirs), rule.join,
                                  rule.sizes))
    return out


def to_ours(theirs: Mapping[str, torch.Tensor], rules: Sequence[TensorRule], n_experts: int
            ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our tensors from checkpoint tensors, and the checkpoint names used."""
    ours, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise InteropError(f"the checkpoint has no tensor {name!r}")
        used.add(name)
        return theirs[name]

    for rule in rules:
        try:
            if rule.join == "copy":
                ours[rule.ours] = take(rule.theirs[0])
            elif rule.join == "cat":
                ours[rule.ours] = torch.cat([take(t) for t in rule.theirs], dim=0)
            elif rule.join == "t":
                ours[rule.ours] = take(rule.theirs[0]).t()
            elif rule.join == "row":  # squeeze, not reshape: [2, n] stays a wrong shape
                ours[rule.ours] = take(rule.theirs[0]).squeeze(0)
            elif rule.join == "experts":
                per_expert = [torch.cat([take(t.format(e=e)) for t in rule.theirs], dim=0) for e in range(n_experts)]
                ours[rule.ours] = torch.stack(per_expert).transpose(1, 2)
            else:  # pragma: no cover - a mapping table bug
                raise ValueError(f"unknown join {rule.join!r}")
        except RuntimeError as exc:  # parts whose shapes cannot be joined
            shapes = {t: tuple(theirs[t].shape) for t in rule.theirs if t in theirs}
            raise InteropError(f"checkpoint tensors {shapes} cannot make {rule.ours!r} ({rule.join}): "
                               f"{str(exc).splitlines()[0]}") from None
    return {k: v.contiguous() for k, v in ours.items()}, used


def to_theirs(ours: Mapping[str, torch.Tensor], rules: Sequence[TensorRule]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from ours: the inverse of `to_ours`. Every one of our tensors is
    consumed by exactly one rule and every checkpoint name written once (or, for one table
    under two of our names, twice with the same values): a tensor left over is a part of
    the model the checkpoint would silently drop."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if name in out and not torch.equal(out[name], tensor):
            raise InteropError(f"checkpoint tensor {name!r} would be written twice with different values "
                               f"(the second time from {source!r})")
        out[name] = tensor

    for rule in rules:
        if rule.ours not in ours:
            raise InteropError(f"the model has no tensor {rule.ours!r} for checkpoint tensor(s) "
                               f"{list(rule.theirs)}")
        if rule.ours in used:
            raise InteropError(f"tensor {rule.ours!r} is written by two rules of the mapping")
        used.add(rule.ours)
        tensor = ours[rule.ours]
        if rule.join == "copy":
            put(rule.theirs[0], tensor, rule.ours)
        elif rule.join == "t":
            put(rule.theirs[0], tensor.t(), rule.ours)
        elif rule.join == "row":
            put(rule.theirs[0], tensor.unsqueeze(0), rule.ours)
        elif rule.join == "cat":
            for name, part in zip(rule.theirs, tensor.split(list(rule.sizes), dim=0)):
                put(name, part, rule.ours)
        elif rule.join == "experts":
            for e, expert in enumerate(tensor.transpose(1, 2).unbind(0)):
                parts = expert.split(list(rule.sizes), dim=0) if len(rule.theirs) > 1 else (expert,)
                for name, part in zip(rule.theirs, parts):
                    put(name.format(e=e), part, rule.ours)
        else:  # pragma: no cover - a mapping table bug must not write a partial checkpoint
            raise ValueError(f"unknown join {rule.join!r}")
    left = sorted(set(ours) - used)
    if left:
        raise InteropError(f"{len(left)} tensor(s) of the model have no place in the checkpoint, e.g. "
                           f"{left[:3]}: writing it would drop them")
    # One tensor written under two names (a tied copy) must be two tensors for safetensors.
    seen: set[int] = set()
    written = {}
    for name, tensor in out.items():
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        written[name] = tensor
    return written


# ------------------------------------------------------------------ the public functions

def _registry() -> dict[str, ModelType]:
    from .types import MODEL_TYPES

    return MODEL_TYPES


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
    rules = _expand(kind.tensors(spec), kind.stacks(spec), spec.model.n_experts)
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
    from .. import build, compose

    cfg = compose([*checkpoint_overrides(path_or_model), *overrides])
    return cfg, build(cfg, device=device)  # building from model.path loads every tensor


def to_hf(model: nn.Module, cfg: DictConfig, out_dir: Union[str, Path], model_type: Optional[str] = None) -> Path:
    """Write `config.json`, `model.safetensors` (and `generation_config.json` when the model
    states token ids) that transformers loads with `from_pretrained` and computes with as
    ours does. A model the type cannot express is refused naming the field, before
    anything is written; without `model_type`, the first type that fits is chosen (see
    `fit.guess`). The folder appears whole or not at all."""
    from .. import resolve_spec
    from .types import choose_type

    spec = resolve_spec(cfg)
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
    rules = _expand(kind.tensors(spec), kind.stacks(spec), spec.model.n_experts)
    theirs = to_theirs(ours, rules)
    tokens = {key: getattr(spec.model, key, None) for key in TOKENS}
    sizes: dict[str, int] = {}  # the weights' dtype as written: the one most of their elements have
    for t in theirs.values():
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            sizes[name] = sizes.get(name, 0) + t.numel()
    hf_config = {"architectures": [kind.architecture], "model_type": kind.name, **kind.hf_config(spec), **tokens}
    if sizes:  # "dtype" for transformers 5, "torch_dtype" for the readers before it
        hf_config["dtype"] = hf_config["torch_dtype"] = max(sizes, key=sizes.__getitem__)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(theirs, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        stated = {k: v for k, v in tokens.items() if v is not None}
        if stated:
            (tmp / GENERATION_NAME).write_text(json.dumps(stated, indent=2) + "\n")
        if out.exists():
            raise InteropError(f"{out} exists: choose a new folder (nothing is overwritten)")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
