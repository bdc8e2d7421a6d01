"""Tasks: what `llmarch` does with a composed config (`task=summary`, `task=train`).

Each task module stores its config dataclass in Hydra's ConfigStore as
`task/<name>` and provides `run(cfg)`.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from ..errors import UnknownChoiceError

TASKS = ("summary", "train", "table")

for _name in TASKS:  # store each task's config node
    importlib.import_module(f"{__name__}.{_name}")


def run_task(cfg: DictConfig) -> Any:
    name = cfg.task.name
    if name not in TASKS:
        raise UnknownChoiceError("task", name, TASKS)
    return importlib.import_module(f"{__name__}.{name}").run(cfg)
