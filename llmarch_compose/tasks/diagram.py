"""`task=diagram`: a picture of the composed model, written as diagram.svg and diagram.png.

    llmarch task=diagram model=deepseek_v3                       # into Hydra's run directory
    llmarch task=diagram model=t5_base task.output=figures/t5     # into a folder of your choice

The model is built on meta (no memory, seconds at any size) and drawn from its spec and its
modules (llmarch_compose/model/anatomy.py and diagram.py): the embeddings and the position
encoding, each stack with a map of which layer is which kind, one box per kind of layer
with its sublayers, their widths and the norms where they sit, the head, and for an
encoder-decoder both stacks with the cross-attention. A training run writes the same
drawing beside its summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from omegaconf import DictConfig

from ..config.spec import resolve_spec
from ..config.structured import to_dataclass
from ..model.diagram import write_diagram
from ..plugin.registry import register
from .train import output_dir


@dataclass
class DiagramTask:
    name: str = "diagram"
    output: Optional[str] = None  # the folder to write; None: Hydra's run directory (or the working directory)


@register("task", "diagram", params=DiagramTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(DiagramTask, cfg.task, "task")
    spec = resolve_spec(cfg)
    out_dir = output_dir(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_diagram(spec, out_dir)
    print(f"diagram of {spec.model.name} in {paths['svg']} and {paths['png']}")
    return {k: str(v) for k, v in paths.items()}


__all__ = ["DiagramTask", "run"]
