"""Tasks: what `llmarch` does with a composed config (`task=summary`, `task=train`).

Each task module stores its config dataclass in Hydra's ConfigStore as
`task/<name>` and provides `run(cfg)`.
"""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from ..errors import UnknownChoiceError

TASKS = ("summary", "train", "table", "export_hf")

for _name in TASKS:  # store each task's config node
    importlib.import_module(f"{__name__}.{_name}")


def run_task(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    from ..config import with_checkpoint

    if HydraConfig.initialized():  # `llmarch model=hf model.path=...`: the checkpoint's own config
        cfg = with_checkpoint(cfg, list(HydraConfig.get().overrides.task))
    name = cfg.task.name
    if name not in TASKS:
        raise UnknownChoiceError("task", name, TASKS)
    return importlib.import_module(f"{__name__}.{name}").run(cfg)
