"""Composing the Hydra config tree, with errors that suggest the nearest names.

The tree lives in `llmarch_compose.conf` (the repository's `conf/`), loaded
with `pkg://` so an installed wheel finds it; plugins add their params to
Hydra's ConfigStore when they are discovered.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Optional, Sequence

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_automatic_config_search_path
from hydra.core.global_hydra import GlobalHydra
from hydra.core.object_type import ObjectType
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from ..errors import ConfigError, UnknownChoiceError, UnknownKeyError
from ..plugin import registry as plugins
from ..plugin.interfaces import ModelSource
from . import schema  # noqa: F401  (stores the root schema the defaults list names)
from .targets import check_targets
from .usage import check_used
from ..artifacts.atomic import creatable_folder

CONFIG_MODULE = "llmarch_compose.conf"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
CONFIG_NAME = "config"
VERSION_BASE = "1.3"


#: Model presets that are not architectures: the checkpoint-folder placeholder.
PLACEHOLDER_PRESETS = ("hf",)


def presets() -> list[str]:
    """The names of the architecture presets in the installed config tree (`tiny` included)."""
    import importlib.resources

    folder = importlib.resources.files(CONFIG_MODULE) / "model"
    return sorted(p.name[:-5] for p in folder.iterdir()
                  if p.name.endswith(".yaml") and p.name[:-5] not in PLACEHOLDER_PRESETS)


#: The model's true/false keys. OmegaConf would read any number there as a bool (-1 as
#: true), so a number set on one is refused instead.
SWITCHES = frozenset(f.name for f in dataclasses.fields(schema.ModelConfig) if f.type in ("bool", bool))


#: The top-level nodes of the schema: deleting one is never what a run means.
REQUIRED_NODES = frozenset(f.name for f in dataclasses.fields(schema.RootConfig))


def _check_switch(key: str, values: Sequence[str]) -> None:
    for value in values:
        if value.strip().lower() not in ("true", "false") and not value.strip().startswith("${"):
            raise ConfigError(key, value, "a switch is true or false", ["true", "false"])


def check_overrides(overrides: Sequence[str], config_loader) -> None:
    """Reject an unknown group choice (also inside a sweep) with the closest names.

    Hydra's own error lists the options but suggests none; this runs first. The options are
    read from the loader's repository itself: the loader's own `list_groups` and
    `get_group_options` copy the whole repository (every stored schema) for each question.
    """
    repository = config_loader.repository
    groups = set(repository.get_group_options("", ObjectType.GROUP))
    try:
        parsed = OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides))
    except (HydraException, ValueError) as exc:  # ValueError: `=5`, a group override that is no string
        raise ConfigError("overrides", " ".join(overrides), str(exc).strip().splitlines()[0]) from None
    for override in parsed:
        group = override.key_or_group
        if override.is_delete():
            if group in REQUIRED_NODES:  # the schema would fill it back with its defaults, silently
                raise ConfigError(group, f"~{group}", "every run needs this node; choose or set its values instead",
                                  f"{group}=<choice>" if group in groups else f"{group}.<key>=<value>")
            continue
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        elif isinstance(override.value(), list):  # several choices of one group: logger=[jsonl,tensorboard]
            values = [str(v) for v in override.value()]
        else:
            values = [override.get_value_element_as_str()]
        if group.startswith("model.") and group[len("model."):] in SWITCHES:
            _check_switch(group, values)
        if group not in groups or override.package:
            continue
        options = set(repository.get_group_options(group, ObjectType.CONFIG))
        for value in values:
            if value not in options:
                raise UnknownChoiceError(group, value, options)


def _translate_missing(exc: MissingConfigException) -> ConfigError:
    """A missing choice named in a defaults list (a preset's `override`, say)."""
    match = re.search(r"Could not find '([^']+)/([^'/]+)'", str(exc))
    if match and exc.options:
        return UnknownChoiceError(match.group(1), match.group(2), exc.options)
    return ConfigError("defaults", getattr(exc, "missing_cfg_file", None), str(exc).strip())


def _translate_composition(exc: HydraException, overrides: Sequence[str],
                           config_name: str = CONFIG_NAME) -> ConfigError:
    """A bad override key or value, named by its key path, with the keys that exist there."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not getattr(cause, "full_key", None):  # a key set in a config file
        cause = cause.__cause__ or cause.__context__  # (a preset's) sits deeper in the chain
    full_key = getattr(cause, "full_key", None)
    if not full_key:
        return ConfigError("overrides", " ".join(overrides), str(exc).strip().splitlines()[0])
    value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == full_key), None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):  # an unknown key: list the ones that exist
        parent = full_key.rpartition(".")[0]
        origin = re.search(r"In '([\w-]+)/([\w-]+)'", str(exc))
        if value is None and origin:  # set by a config file the command line chose (a preset's own key)
            group, name = origin.groups()
            kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] != group]
            keys = sorted(_keys_at(parent, kept, config_name))
            return ConfigError(full_key, None, f"{group}={name} sets this key, which {parent} does not have "
                               "with the other choices made", keys or None)
        keys = _keys_at(parent, [o for o in overrides if not o.lstrip("+~").startswith(full_key)], config_name)
        return UnknownKeyError(full_key, value, keys)
    return ConfigError(full_key, value, str(getattr(cause, "msg", cause)).strip().splitlines()[0])


def _keys_at(path: str, overrides: Sequence[str], config_name: str = CONFIG_NAME) -> list[str]:
    try:
        node = OmegaConf.select(hydra_compose(config_name=config_name, overrides=list(overrides)), path)
        return list(node.keys()) if isinstance(node, DictConfig) else []
    except HydraException:
        return []


def _first_of_each_sweep(overrides: Sequence[str], config_loader) -> list[str]:
    """One job's overrides from a sweep, to check keys and values before the sweep starts."""
    out = []
    for override in OverridesParser.create(config_loader=config_loader).parse_overrides(list(overrides)):
        text = override.input_line
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            text = f"{override.get_key_element()}={first}"
        out.append(text)
    return out


def _compose_checked(overrides: Sequence[str], config_name: str = CONFIG_NAME,
                     hydra_node: bool = False, checked: Sequence[str] = ()) -> DictConfig:
    loader = GlobalHydra.instance().config_loader()
    check_overrides(overrides, loader)
    single = _first_of_each_sweep(overrides, loader)
    try:
        cfg = hydra_compose(config_name=config_name, overrides=single, return_hydra_config=hydra_node)
    except MissingConfigException as exc:
        raise _translate_missing(exc) from None
    except HydraException as exc:
        raise _translate_composition(exc, single, config_name) from None
    except ValueError as exc:  # Hydra's own check of an override's form (`=5`: a group override that is no string)
        raise ConfigError("overrides", " ".join(single), str(exc).strip().splitlines()[0]) from None
    check_targets(cfg)
    _check_resolves(cfg)
    if checked:  # a model number the caller set that nothing reads is refused
        check_used(cfg, _first_of_each_sweep(checked, loader), loader)
    return cfg


def _check_resolves(cfg: DictConfig) -> None:
    """Every interpolation outside `hydra` resolves: a missing key or a key that refers to
    itself is a ConfigError naming it, before any job starts."""
    try:
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "overrides"
        raise ConfigError(key, None, str(getattr(exc, "msg", exc)).strip().splitlines()[0]) from None


def _initialize(config_dir: Optional[str], config_path: Optional[str]) -> None:
    """Hydra's search path as `llmarch --config-dir D --config-path P` builds it (see
    hydra._internal.utils.run_hydra), so a config file there is checked too."""
    search_path = create_automatic_config_search_path(None, None, config_path or CONFIG_PATH)
    if config_dir is not None:
        folder = Path(config_dir).expanduser().absolute()
        if not folder.is_dir():
            raise ConfigError("--config-dir", config_dir, "no such folder", "an existing folder of configs")
        search_path.prepend(provider="command-line", path=f"file://{folder}",
                            anchor=SearchPathQuery(provider="schema"))
    Hydra.create_main_hydra2(task_name="llmarch", config_search_path=search_path)


def _check_run_folder(cfg: DictConfig, multirun: bool) -> None:
    """The folder Hydra will create for this run (or sweep) can be created: a path through a
    file, under `/proc` or without permission is a ConfigError, not a traceback from Hydra."""
    key = "hydra.sweep.dir" if multirun or str(OmegaConf.select(cfg, "hydra.mode")) == "RunMode.MULTIRUN" \
        else "hydra.run.dir"
    try:
        folder = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
    except OmegaConfBaseException:  # refers to what Hydra fills in per job: it checks that one itself
        return
    problem = creatable_folder(folder) if isinstance(folder, str) and folder else None
    if problem:
        raise ConfigError(key, folder, problem, "a folder that can be created and written")


def check(overrides: Sequence[str], config_dir: Optional[str] = None, config_path: Optional[str] = None,
          config_name: Optional[str] = None, multirun: bool = False) -> None:
    """Everything Hydra would reject in `overrides` (the first job of a sweep), as a
    ConfigError with suggestions, and every import path the composed config (its `hydra`
    node included) may not name; the CLI runs this, with its `--config-dir`,
    `--config-path` and `--config-name`, before handing over to Hydra."""
    plugins.discover()
    GlobalHydra.instance().clear()
    try:
        _initialize(config_dir, config_path)
        _check_run_folder(_compose_checked(overrides, config_name or CONFIG_NAME, hydra_node=True,
                                           checked=overrides), multirun)
    finally:
        GlobalHydra.instance().clear()


def model_source(path: str) -> ModelSource:
    """The registered model source that reads the folder `path` (`model.path`)."""
    folder = Path(path).expanduser()
    sources = plugins.entries("model_source")
    if not folder.is_dir():
        raise ConfigError("model.path", path, "no such folder", "a checkpoint folder, e.g. one with config.json")
    for info in sources.values():
        if info.target.recognizes(folder):
            return info.target
    raise ConfigError("model.path", path, "no model source reads this folder", sorted(sources) or None)


def with_checkpoint(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """For `model=hf model.path=<dir>`: the config the checkpoint folder describes, with the
    user's other overrides on top. Other configs pass through."""
    if cfg.model.get("name") == "hf" and not cfg.model.get("path"):
        raise ConfigError("model.path", None, "model=hf builds from a Hugging Face checkpoint folder",
                          "model.path=<a folder with config.json and *.safetensors>")
    path = cfg.model.get("path")
    if not path or str(cfg.model.get("name", "")).startswith("hf:"):
        return cfg
    mine = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in ("model", "model.path")]
    return compose(mine, described=model_source(path).overrides(Path(path).expanduser()))


def compose(overrides: Sequence[str] = (), config_name: str = CONFIG_NAME, *, strict: bool = False,
            described: Sequence[str] = ()) -> DictConfig:
    """The composed config for `overrides`, as `llmarch` would see it (without `hydra.`).

    As on the command line, a `model.` number set in `overrides` that no chosen plugin reads is
    refused, naming the plugin that would (`model.window=4096` under attention=gqa).
    `strict=False` lets one list of numbers serve every choice of a loop (the numbers a choice
    does not read are then listed as unused on its card). `described`: overrides that describe a
    checkpoint (a Hugging Face folder's config), applied first and exempt from that check."""
    plugins.discover()
    checked = list(overrides) if strict else []
    overrides = [*described, *overrides]
    if config_name != CONFIG_NAME:
        raise ConfigError("config_name", config_name, "unknown root config", [CONFIG_NAME])
    owned = not GlobalHydra.instance().is_initialized()
    if owned:
        context = initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE)
        context.__enter__()
    try:
        return with_checkpoint(_compose_checked(overrides, checked=checked), overrides)
    finally:
        if owned:
            GlobalHydra.instance().clear()
