"""Which import paths a composed config may name: nothing a user writes is instantiated by path.

Hydra instantiates every `_target_` under `hydra.callbacks`, `hydra.launcher` and
`hydra.sweeper` (and logging's `()` factories) before a job starts, so a config that
names `builtins.open` or `torch.load` there runs it. The composed tree, the `hydra`
node included, may name only:

- under `hydra.callbacks`: Hydra's own callbacks (`hydra.*` Callback classes) and those
  registered in the `hydra_callback` adapter group (the project's sweep report, a plugin
  package's own);
- as `hydra.launcher._target_` / `hydra.sweeper._target_`: a Launcher / Sweeper class of
  an installed Hydra plugin (`hydra_plugins.*`, or Hydra's built-ins in `hydra._internal.*`);
- inside the sweeper node: the sampler and pruner classes the Optuna sweeper builds.

Any other `_target_` (or a logging `()` factory) is a ConfigError naming its key.

Logging configs (`hydra.job_logging`, `hydra.hydra_logging`) go to
`logging.config.dictConfig`, which imports and calls the `class` of every handler,
formatter and filter and resolves `ext://` values by import: those may name only classes
of the logging package, `ext://` only the standard streams, and a handler's `filename`
only a file inside the run's folder (a relative path, or one under
`${hydra.runtime.output_dir}`), so a config can neither run code nor truncate a file
elsewhere.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Iterator, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError
from ..plugin import registry as plugins

TARGET = "_target_"
FACTORY = "()"  # logging.config.dictConfig calls whatever this names
PLUGIN_PREFIXES = ("hydra_plugins.", "hydra._internal.")
#: Classes the Optuna sweeper instantiates from its own node, by base class.
SWEEPER_PARTS = {"optuna.samplers.": "optuna.samplers.BaseSampler", "optuna.pruners.": "optuna.pruners.BasePruner"}


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(key path, raw value) of every `_target_` and `()` in the tree, unresolved."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            child = node._get_node(key)
            sub = f"{path}.{key}" if path else str(key)
            if key in (TARGET, FACTORY):
                yield sub, child._value() if child is not None else None
                continue
            if child is not None and child._is_interpolation():  # `x: ${y}` instantiates what y holds
                try:
                    child = node[key]
                except Exception:  # unresolvable here (hydra.runtime is filled in later): nothing to walk
                    continue
            yield from _walk(child, sub)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _walk(node._get_node(i), f"{path}[{i}]")


def _load(path: str) -> Optional[Any]:
    """The class `path` names, imported only from a package the caller already trusts."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _is_subclass(path: str, base_path: str) -> bool:
    cls, base = _load(path), _load(base_path)
    return isinstance(cls, type) and isinstance(base, type) and issubclass(cls, base)


def _class_path(cls: Any) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def registered_callbacks() -> dict[str, str]:
    """class path -> registered name, for the `hydra_callback` adapter group."""
    return {_class_path(info.target): name for name, info in plugins.entries("hydra_callback").items()}


def _allowed(key: str, target: str, callbacks: dict[str, str]) -> tuple[bool, str]:
    """Whether `target` may stand at `key`, and what may stand there instead."""
    parts = key.split(".")
    if len(parts) == 4 and parts[:2] == ["hydra", "callbacks"] and parts[3] == TARGET:
        if target in callbacks:
            return True, ""
        ok = target.startswith("hydra.") and _is_subclass(target, "hydra.experimental.callback.Callback")
        return ok, "a callback registered in the hydra_callback group (" + ", ".join(sorted(callbacks)) + \
            ") or one of Hydra's own (hydra.experimental.callbacks.*)"
    if key in ("hydra.launcher._target_", "hydra.sweeper._target_"):
        base = "hydra.plugins.launcher.Launcher" if parts[1] == "launcher" else "hydra.plugins.sweeper.Sweeper"
        ok = target.startswith(PLUGIN_PREFIXES) and _is_subclass(target, base)
        return ok, f"a {parts[1]} of an installed Hydra plugin, chosen as hydra/{parts[1]}=<name>"
    if key.startswith("hydra.sweeper.") and parts[-1] == TARGET:
        for prefix, base in SWEEPER_PARTS.items():
            if target.startswith(prefix) and _is_subclass(target, base):
                return True, ""
        return False, "an Optuna sampler or pruner class (optuna.samplers.*, optuna.pruners.*)"
    return False, "nothing: a config selects components by registry name, never by import path"


LOGGING_NODES = ("hydra.job_logging", "hydra.hydra_logging")
LOGGING_BASES = {"handlers": "logging.Handler", "formatters": "logging.Formatter", "filters": "logging.Filter"}
STREAMS = ("ext://sys.stdout", "ext://sys.stderr")
RUN_DIR = "${hydra.runtime.output_dir}/"


def _raw(node: DictConfig, key: str) -> Any:
    child = node._get_node(key) if key in node else None  # struct nodes raise on a missing key
    return child._value() if child is not None else None


JOB_NAME = "${hydra.job.name}"  # Hydra's default log file is named after the job


def _inside_run_dir(filename: Any) -> bool:
    text = str(filename)
    rest = (text[len(RUN_DIR):] if text.startswith(RUN_DIR) else text).replace(JOB_NAME, "job")
    return not (rest.startswith(("/", "~", "$")) or ".." in Path(rest).parts or "${" in rest)


def _walk_values(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(key path, raw value) of every leaf under `node`."""
    if isinstance(node, DictConfig):
        for key in node.keys():
            yield from _walk_values(node._get_node(key), f"{path}.{key}")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _walk_values(node._get_node(i), f"{path}[{i}]")
    elif node is not None:
        yield path, node._value()


def check_logging(cfg: DictConfig) -> None:
    """Refuse a logging config that would import anything but the logging package's
    classes, or write a log file outside the run's folder (see the module docstring)."""
    job_name = OmegaConf.select(cfg, "hydra.job.name", default=None)
    if isinstance(job_name, str) and ("/" in job_name or job_name in ("", ".", "..")):
        raise ConfigError("hydra.job.name", job_name, "the job's log file is named after it", "a name without '/'")
    for name in LOGGING_NODES:
        node = OmegaConf.select(cfg, name, default=None)
        if not isinstance(node, DictConfig):
            continue
        for key, value in _walk_values(node, name):
            if isinstance(value, str) and value.startswith("ext://") and value not in STREAMS:
                raise ConfigError(key, value, "`ext://` imports what it names", STREAMS)
        for section, base in LOGGING_BASES.items():
            entries = node.get(section)
            if not isinstance(entries, DictConfig):
                continue
            for entry_name in entries.keys():
                entry, key = entries._get_node(entry_name), f"{name}.{section}.{entry_name}"
                if not isinstance(entry, DictConfig):
                    continue
                cls = _raw(entry, "class")
                if cls is not None and not (isinstance(cls, str) and cls.startswith("logging.")
                                            and _is_subclass(cls, base)):
                    raise ConfigError(f"{key}.class", cls, "logging imports and calls this class",
                                      f"a {base} class of the logging package (logging.*)")
                filename = _raw(entry, "filename")
                if filename is not None and not _inside_run_dir(filename):
                    raise ConfigError(f"{key}.filename", filename, "a log file is written inside the run's folder",
                                      f"a relative path, or one under {RUN_DIR}")


def check_targets(cfg: DictConfig) -> None:
    """Refuse any import path in `cfg` (composed with or without its `hydra` node) that is
    not one of those the module docstring lists."""
    callbacks: Optional[dict[str, str]] = None
    for key, value in _walk(cfg, ""):
        if key.endswith(FACTORY):
            raise ConfigError(key, value, "a logging factory runs whatever it names",
                              "a handler or formatter `class` from the logging package")
        if callbacks is None:
            callbacks = registered_callbacks()
        target = value if isinstance(value, str) else OmegaConf.to_container(value) if value is not None else None
        ok, valid = _allowed(key, target, callbacks) if isinstance(target, str) else (False, "a class path")
        if not ok:
            raise ConfigError(key, target, "this import path may not be instantiated from a config", valid)
    check_logging(cfg)
