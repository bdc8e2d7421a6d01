"""Tasks: what `llmarch` does with a composed config (`task=summary`, `task=train`, ...).

Every public module of this package is a task: it registers its `run(cfg)` with
`@register("task", name, params=ItsConfig)`, which also stores the config node as
`task/<name>`. Tasks are thin: they read their node, call the library and print.
A third-party package adds a task the same way, from a module its entry point names.
The registry imports this package when it discovers the entry points, not before.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from omegaconf import DictConfig

from ..config.compose import with_checkpoint
from ..plugin import registry

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")


def run_task(cfg: DictConfig, overrides: list[str] | None = None) -> Any:
    """Run the task `cfg.task` names. `overrides` are the command line's, for a config
    built from a checkpoint folder (`model=hf model.path=...`)."""
    if overrides is not None:
        cfg = with_checkpoint(cfg, overrides)
    return registry.get("task", cfg.task.name).target(cfg)
