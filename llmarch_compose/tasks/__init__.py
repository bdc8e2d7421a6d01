"""Tasks: what `llmarch` does with a composed config (`task=summary`, `task=train`, ...).

Every public module of this package is a task: it stores its config dataclass
in Hydra's ConfigStore as `task/<name>` and provides `run(cfg)`. A new task is
one new file here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from omegaconf import DictConfig

from ..errors import UnknownChoiceError

TASKS = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))

for _name in TASKS:  # store each task's config node
    importlib.import_module(f"{__name__}.{_name}")


def run_task(cfg: DictConfig) -> Any:
    from hydra.core.hydra_config import HydraConfig

    from ..config.compose import with_checkpoint

    if HydraConfig.initialized():  # `llmarch model=hf model.path=...`: the checkpoint's own config
        cfg = with_checkpoint(cfg, list(HydraConfig.get().overrides.task))
    name = cfg.task.name
    if name not in TASKS:
        raise UnknownChoiceError("task", name, TASKS)
    return importlib.import_module(f"{__name__}.{name}").run(cfg)
