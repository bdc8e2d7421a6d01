"""`task=export_hf`: write the model as a Hugging Face checkpoint folder.

The weights come from a checkpoint of ours (`task.checkpoint=<folder>`, what
`task=train` writes), or from `model=hf model.path=<dir>`; a model with neither
would be random and is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from ..model.build import build
from ..artifacts.checkpoint import load_checkpoint
from ..errors import ConfigError
from ..interop.hf import to_hf
from ..config.structured import to_dataclass
from ..plugin.registry import register


@dataclass
class ExportHFTask:
    name: str = "export_hf"
    output: Optional[str] = None  # the folder to create (must not exist)
    checkpoint: Optional[str] = None  # one of our checkpoint folders to export
    model_type: Optional[str] = None  # None: the type the architecture matches


@register("task", "export_hf", params=ExportHFTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(ExportHFTask, cfg.task, "task")
    if not task.output:
        raise ConfigError("task.output", task.output, "name the folder to write", "a path that does not exist")
    if task.checkpoint:
        cfg, model = load_checkpoint(task.checkpoint)
    elif cfg.model.get("path"):
        model = build(cfg)
    else:
        raise ConfigError("task.checkpoint", None, "exporting needs trained weights",
                          "a folder written by task=train, or model=hf model.path=<dir>")
    out = to_hf(model, cfg, task.output, model_type=task.model_type)
    print(f"wrote {out}")
    return {"output": str(out)}
