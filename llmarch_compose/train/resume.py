"""Checkpoints a run resumes from: `task.checkpoint_every=K` writes, every K steps, the
model, the optimizer, the learning-rate schedule, the step, the random states and the
data position (the state of the generator the batches are drawn from), with
`torch.distributed.checkpoint` (each rank writes its own shards under FSDP2; nothing is
gathered to one rank). `task.keep_checkpoints=M` keeps the newest M.

Layout: `<output>/checkpoints/step_00000040/` holds DCP's shard files and `.metadata`
(tensors only) and `trainer.json` (the step, the optimizer's hyper-parameters, the
schedule's counters, the run's progress: plain JSON). A checkpoint is complete or
absent: it is written under `.step_00000040.partial` and renamed once every rank has
written and `trainer.json` is in place, so a run killed while writing leaves the
previous checkpoint as the newest. DCP restores each tensor into the layout of the
resuming run, so a run resumes on a different number of ranks.

Nothing read here runs code: DCP's `.metadata` is a pickle, read through an unpickler
that builds only the checkpoint metadata classes (`SafeReader`), and no non-tensor value
is stored through DCP (whose loader would unpickle it).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import pickle
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..artifacts.atomic import fsync_folder
from ..artifacts.reading import read_json
from ..errors import ConfigError, LlmarchError
from .parallel import SINGLE, World, barrier

FOLDER = "checkpoints"
TRAINER = "trainer.json"
STEP_NAME = re.compile(r"^step_(\d{8,})$")
FORMAT = 1
# torch.distributed.checkpoint is imported where it is used: it takes half a second,
# which every command (`llmarch task=summary`) would otherwise pay.


class ResumeError(LlmarchError):
    """A checkpoint that cannot be resumed from; names the folder and what is wrong."""


def step_folder(out_dir: Path, step: int) -> Path:
    return out_dir / FOLDER / f"step_{step:08d}"


def is_complete(folder: Path) -> bool:
    return (folder / TRAINER).is_file() and (folder / ".metadata").is_file()


def complete_checkpoints(out_dir: Path) -> list[Path]:
    """The complete checkpoints under `out_dir`, oldest first."""
    root = out_dir / FOLDER
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_NAME.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def resolve(resume: Optional[str], out_dir: Path) -> Optional[Path]:
    """The checkpoint `task.resume` names: null (start fresh), `auto` (the newest complete
    one under the run's output; none yet: start fresh), or a checkpoint folder, or a run
    folder (its newest), which must hold a complete one."""
    if resume is None:
        return None
    if resume == "auto":
        found = complete_checkpoints(out_dir)
        return found[-1] if found else None
    path = Path(resume).expanduser()
    if is_complete(path):
        return path
    found = complete_checkpoints(path) if path.is_dir() else []
    if found:
        return found[-1]
    why = "does not exist" if not path.exists() else "holds no complete checkpoint (step_*/ with trainer.json)"
    raise ConfigError("task.resume", resume, why, "auto, null, or a folder a run with task.checkpoint_every wrote")


# ---- what is saved ---------------------------------------------------------------------


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
                  ) -> dict[str, Any]:
    """Everything DCP stores, tensors only (the optimizer's state is created if it is not yet)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optim = get_optimizer_state_dict(model, optimizer)
    rng = {"torch": torch.get_rng_state(), "data": generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    return {"model": get_model_state_dict(model), "optimizer": optim["state"], "rng": rng}


def _param_groups(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    groups = get_optimizer_state_dict(model, optimizer)["param_groups"]
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """DCP warns that it saves and loads in one process when there is no process group: that is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@dataclass
class Resumed:
    """What a run continues with: its step and the progress figures its summary carries on."""

    step: int
    progress: dict[str, Any]
    folder: Path


def save(out_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, generator: torch.Generator, progress: dict[str, Any], keep: int,
         world: World = SINGLE) -> Path:
    """Write the checkpoint of `step` (every rank calls this) and keep the newest `keep`."""
    import torch.distributed.checkpoint as dcp

    final = step_folder(out_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    if world.is_main:
        for stale in (final.parent.glob(".step_*.partial") if final.parent.is_dir() else []):
            shutil.rmtree(stale)  # what a killed save left
        partial.mkdir(parents=True)
    barrier(world)
    with _one_process_is_fine():
        dcp.save(_tensor_state(model, optimizer, generator), checkpoint_id=str(partial))
    groups = _param_groups(model, optimizer)
    if world.is_main:
        trainer = {"format": FORMAT, "step": step, "world_size": world.size, "param_groups": groups,
                   "scheduler": scheduler.state_dict(), "progress": progress}
        with open(partial / TRAINER, "w") as f:
            f.write(json.dumps(trainer, indent=1, allow_nan=False))
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # a checkpoint of this step from a run this one replaced
            shutil.rmtree(final)
        os.rename(partial, final)
        fsync_folder(final.parent)
        for old in complete_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old)
    barrier(world)
    return final


def load(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
         generator: torch.Generator) -> Resumed:
    """Restore everything `save` wrote into this run's model, optimizer, schedule and
    generators (every rank calls this); a ResumeError names what does not fit."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainer = read_json(folder / TRAINER, error=ResumeError)
    if not isinstance(trainer, dict) or trainer.get("format") != FORMAT:
        raise ResumeError(f"{folder / TRAINER}: not a trainer state of format {FORMAT}")
    for key, kind in (("step", int), ("param_groups", list), ("scheduler", dict), ("progress", dict)):
        if not isinstance(trainer.get(key), kind) or isinstance(trainer.get(key), bool):
            raise ResumeError(f"{folder / TRAINER}: {key} must be a JSON {kind.__name__}")
    state = _tensor_state(model, optimizer, generator)
    try:
        with _one_process_is_fine():
            dcp.load(state, storage_reader=safe_reader(folder))
    except (RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError, dcp.api.CheckpointException) as exc:
        detail = " ".join(str(exc).split())
        raise ResumeError(f"{folder}: does not hold this run's model and optimizer: {detail[:600]}") from None
    set_model_state_dict(model, state["model"])
    try:
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in trainer["param_groups"]]
        set_optimizer_state_dict(model, optimizer, {"state": state["optimizer"], "param_groups": groups})
        scheduler.load_state_dict(trainer["scheduler"])
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ResumeError(f"{folder / TRAINER}: its optimizer or schedule does not fit this run ({exc})") from None
    torch.set_rng_state(state["rng"]["torch"])
    generator.set_state(state["rng"]["data"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return Resumed(int(trainer["step"]), dict(trainer.get("progress") or {}), folder)


# ---- DCP's metadata, read without running code -------------------------------------------


class _MetadataUnpickler(pickle.Unpickler):
    """Builds the classes a DCP `.metadata` holds, and nothing else: a pickle that names
    any other callable (how a pickle runs code) is refused."""

    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")
    BUILTINS = {("collections", "OrderedDict"), ("torch", "Size"), ("builtins", "set"), ("builtins", "frozenset"),
                ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}
    # torch.layout pickles as a call of this lookup by name (it returns a layout, nothing else).
    FUNCTIONS = {("torch.serialization", "_get_layout")}

    def find_class(self, module: str, name: str) -> Any:
        if module in self.MODULES or (module, name) in self.BUILTINS:
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        if (module, name) in self.FUNCTIONS:
            return super().find_class(module, name)
        if module == "torch":  # dtypes, layouts and memory formats pickle as torch.<name>
            found = getattr(torch, name, None)
            if isinstance(found, (torch.dtype, torch.layout, torch.memory_format)):
                return found
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which a checkpoint never holds")


@functools.lru_cache(maxsize=None)
def _safe_reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's file reader with `.metadata` read by `_MetadataUnpickler`."""

        def read_metadata(self, *args: Any, **kwargs: Any):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"{path}: not checkpoint metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def safe_reader(folder: Path):
    """A DCP storage reader for `folder` whose metadata is read without running code."""
    return _safe_reader_class()(str(folder))


__all__ = ["save", "load", "resolve", "complete_checkpoints", "Resumed", "ResumeError", "safe_reader"]
