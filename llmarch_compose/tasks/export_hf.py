"""`task=export_hf`: write the model as a Hugging Face checkpoint folder.

The weights come from a checkpoint of ours (`task.checkpoint=<folder>`, what
`task=train` writes), or from `model=hf model.path=<dir>`; a model with neither
would be random and is refused. The tokenizer files that folder holds (a model
trained with `data.tokenizer=...`) are written too: the export is a complete model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from ..model.build import build
from ..artifacts.atomic import published
from ..artifacts.checkpoint import load_checkpoint, trained_tokenizer
from ..artifacts.tokenizer import has_tokenizer
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
        folder = published(task.checkpoint)
        cfg, model = load_checkpoint(task.checkpoint)
    elif cfg.model.get("path"):
        folder = Path(cfg.model.path).expanduser()
        model = build(cfg)
    else:
        raise ConfigError("task.checkpoint", None, "exporting needs trained weights",
                          "a folder written by task=train, or model=hf model.path=<dir>")
    tokenizer = folder if has_tokenizer(folder) else None  # the folder's own tokenizer goes with it
    trained = trained_tokenizer(cfg) if task.checkpoint else None
    if tokenizer is None and trained:
        if has_tokenizer(trained):  # a checkpoint saved before tokenizers were: where it was trained from
            tokenizer = Path(trained).expanduser()
        else:
            print(f"llmarch: warning: {folder} holds no tokenizer files, though its model was trained with "
                  f"data.tokenizer={trained}; the export has none either (copy that tokenizer's files into it)",
                  file=sys.stderr)
    out = to_hf(model, cfg, task.output, model_type=task.model_type, tokenizer=tokenizer)
    print(f"wrote {out}" + (" (with the tokenizer)" if tokenizer else ""))
    return {"output": str(out), "tokenizer": tokenizer is not None}
