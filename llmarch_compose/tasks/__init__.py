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
from pathlib import Path
from typing import Any, Optional

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..config.compose import with_checkpoint
from ..config.match import with_baseline
from ..errors import ConfigError
from ..train import parallel
from ..plugin import registry

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")


def run_task(cfg: DictConfig, overrides: list[str] | None = None) -> Any:
    """Run the task `cfg.task` names. `overrides` are the command line's, for a config
    built from a checkpoint folder (`model=hf model.path=...`)."""
    if overrides is not None:
        cfg = with_checkpoint(cfg, overrides)
    cfg = with_baseline(cfg, _sweep_dir())  # model.match_target=baseline: the sweep's first job's figure
    _refuse_parallel_outside_training(cfg)
    return registry.get("task", cfg.task.name).target(cfg)


def _sweep_dir() -> Optional[Path]:
    """The folder of the sweep this job belongs to; None outside a sweep."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).absolute()


def _refuse_parallel_outside_training(cfg: DictConfig) -> None:
    """Only training spreads over processes: another task under `parallel=...` or under
    torchrun's several processes would ignore it, or run N times into the same files."""
    if cfg.task.name == "train":
        return
    strategy = cfg.get("parallel", {}).get("name", "none") if cfg.get("parallel") is not None else "none"
    if strategy != "none":
        raise ConfigError("parallel", strategy, f"only task=train runs over several processes, not "
                          f"task={cfg.task.name}", ["none"])
    world = parallel.launched_by_torchrun()
    if world is not None and world.size > 1:
        raise ConfigError("task", cfg.task.name, f"torchrun started {world.size} processes, and only task=train "
                          "runs over several", "task=train, or this task without torchrun")
