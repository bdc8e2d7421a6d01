"""The registry of named choices: how plugins, tasks, data sources and the other
named parts are registered, discovered and looked up.

Everything a user selects by name goes through one mechanism:
- the component groups (`GROUPS`): a params dataclass plus the module class it builds,
  registered with `@register(group, name, params=...)`; its node carries the reserved
  keys `plugin` and `name`;
- the other config groups (`CHOICE_GROUPS`: task, data, precision, scale, compile): a
  node whose own `name` field is the choice, and what the choice runs (a task's `run`, a
  data source's factory; nothing for pure settings);
- named parts that are no config group (`ADAPTER_GROUPS`): Hugging Face model types
  and model sources, looked up by the adapters above the core, and the Hydra
  callbacks a config may name under `hydra.callbacks` (`add("hydra_callback", name,
  CallbackClass)`; see llmarch_compose/config/targets.py).

Registration also stores each config node in Hydra's ConfigStore as `<group>/<name>`,
so `attention=gqa` or `task=summary` composes with or without a YAML file. Built-in
and third-party modules are found the same way, through the `llmarch_compose.plugins`
entry-point group. Configs select by registry key only: nothing in a config is ever
imported by path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

from hydra.core.config_store import ConfigStore

from ..errors import LlmarchError, PluginConflictError, UnknownChoiceError
from .interfaces import ComponentParams

#: The component groups a plugin can belong to, in build order.
GROUPS = ("position", "norm", "activation", "attention", "ffn", "topology")
#: The other config groups whose choices are registered: each node names itself (`name`).
CHOICE_GROUPS = ("task", "data", "precision", "scale", "compile", "parallel")
#: Named parts that are not config groups: read by the adapters above the core.
ADAPTER_GROUPS = ("hf_model_type", "model_source", "hydra_callback")
ALL_GROUPS = (*GROUPS, *CHOICE_GROUPS, *ADAPTER_GROUPS)
#: The entry-point group through which built-in and third-party modules are found.
ENTRY_POINT_GROUP = "llmarch_compose.plugins"
#: Keys every component node carries besides the plugin's own parameters.
RESERVED_KEYS = ("plugin", "name")


@dataclass(frozen=True)
class PluginInfo:
    """One registered choice: a plugin, a task, a data source, a setting or an adapter part."""

    group: str
    name: str
    target: Any  # the plugin class, the task's run function, the source factory, the part; None for settings
    params: Optional[type]  # the params dataclass (None for adapter parts)
    node: Any  # what ConfigStore holds: a dataclass or an instance (None for adapter parts)
    module: str
    package: str

    @property
    def cls(self) -> type:
        """The module class of a component plugin."""
        return self.target

    @property
    def doc(self) -> str:
        """The docstring's first paragraph on one line (docstrings here wrap their summary): the
        target's own, else its module's (a task's `run` is described by its module)."""
        text = getattr(self.target, "__doc__", None) if callable(self.target) else None
        if not text:
            module = sys.modules.get(self.module)
            text = module.__doc__ if module is not None else ""
        paragraph = (text or "").strip().split("\n\n")[0]
        return " ".join(line.strip() for line in paragraph.splitlines())

    @property
    def version(self) -> str | None:
        """The installed version of the distribution that registered it, if it has one."""
        try:
            return importlib.metadata.version(self.package)
        except importlib.metadata.PackageNotFoundError:
            return None


@dataclass
class NoParams:
    """Params of a plugin that takes none."""


_registry: dict[str, dict[str, PluginInfo]] = {g: {} for g in ALL_GROUPS}
_loading_package: list[str] = []  # the distribution whose entry point is being loaded
_discovered = False
_discovery_error: LlmarchError | None = None  # kept so that every later lookup fails the same way


def _component_node(group: str, name: str, params: type) -> type:
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of {group}/{name} must be a dataclass, got {params!r}")
    clash = [f.name for f in dataclasses.fields(params) if f.name in RESERVED_KEYS]
    if clash:
        raise TypeError(f"params of {group}/{name} may not define the reserved keys {clash}")
    # ComponentParams last: the hooks the core calls exist on every node, and the plugin's own
    # (a `validate` of its dataclass) come first.
    return dataclasses.make_dataclass(
        f"{params.__name__}Node",
        [("plugin", str, field(default=name)), ("name", str, field(default=name))],
        bases=(params, ComponentParams),
    )


def _choice_node(group: str, name: str, params: Optional[type], node: Any) -> tuple[type, Any]:
    """A choice's node is its params dataclass, or an instance of one; its `name` must be the choice's."""
    node = node if node is not None else params
    if node is None or not dataclasses.is_dataclass(node):
        raise TypeError(f"{group}/{name} needs a params dataclass (or a node instance), got {node!r}")
    params = node if isinstance(node, type) else type(node)
    own = node.name if not isinstance(node, type) else next(
        (f.default for f in dataclasses.fields(node) if f.name == "name"), None)
    if own != name:
        raise TypeError(f"the node of {group}/{name} must have name={name!r} (its `name` field), got {own!r}")
    return params, node


def add(group: str, name: str, target: Any = None, params: Optional[type] = None, node: Any = None) -> PluginInfo:
    """Register `target` as the choice `name` of `group`; see the module docstring for what each
    kind of group takes. A name registered again from another module is a conflict."""
    if group not in _registry:
        raise UnknownChoiceError("plugin group", group, ALL_GROUPS, what="name")
    if group in GROUPS:
        params = params or NoParams
        node = _component_node(group, name, params)
    elif group in CHOICE_GROUPS:
        params, node = _choice_node(group, name, params, node)
    # A setting (target None) belongs to the module that defines its node's dataclass.
    module = getattr(target, "__module__", None) or (params.__module__ if params is not None else "?")
    package = _loading_package[-1] if _loading_package else distribution_of(module)
    existing = _registry[group].get(name)
    if existing is not None and existing.module != module:
        raise PluginConflictError(
            f"{group} plugin {name!r} is registered twice: by {existing.package} "
            f"({existing.module}.{_label(existing.target)}) and by {package} ({module}.{_label(target)}); "
            "uninstall one or rename it"
        )
    info = PluginInfo(group, name, target, params, node, module, package)
    _registry[group][name] = info
    if node is not None:
        ConfigStore.instance().store(group=group, name=name, node=node, provider=package)
    return info


def register(group: str, name: str, params: type | None = None, node: Any = None) -> Callable[[Any], Any]:
    """Decorator: make the class (or function) the choice `name` of `group`, configured by `params`."""
    if group not in _registry:
        raise UnknownChoiceError("plugin group", group, ALL_GROUPS, what="name")
    if group in GROUPS:  # a bad params class fails where it is named, before anything is decorated
        _component_node(group, name, params or NoParams)

    def decorate(target: Any) -> Any:
        info = add(group, name, target, params=params, node=node)
        if group in GROUPS:
            target.plugin_group, target.plugin_name, target.params_class = group, name, info.params
        return target

    return decorate


def _label(target: Any) -> str:
    return getattr(target, "__qualname__", type(target).__name__)


@functools.lru_cache(maxsize=None)
def _distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def distribution_of(module: str) -> str:
    """The installed distribution that provides `module` (its top-level name if none)."""
    top = module.split(".")[0]
    return (_distributions().get(top) or [top])[0]


def discover() -> None:
    """Import every module named in the `llmarch_compose.plugins` entry-point group, once."""
    global _discovered, _discovery_error
    if _discovery_error is not None:  # a half-loaded registry must not pass for a whole one
        raise _discovery_error
    if _discovered:
        return
    _discovered = True
    for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        package = ep.dist.name if ep.dist is not None else ep.value.split(".")[0]
        _loading_package.append(package)
        try:
            ep.load()
        except LlmarchError as exc:
            _discovery_error = exc
            raise
        except Exception as exc:  # a broken third-party plugin must say which one it is
            _discovery_error = LlmarchError(
                f"loading plugin entry point {ep.name!r} = {ep.value!r} from {package} failed: "
                f"{type(exc).__name__}: {exc}"
            )
            raise _discovery_error from exc
        finally:
            _loading_package.pop()
    if not any(_registry[g] for g in GROUPS):
        raise LlmarchError(
            f"no plugins are registered under the entry-point group {ENTRY_POINT_GROUP!r}; "
            "install the package (pip install -e .) so that its entry points exist"
        )


def names(group: str) -> list[str]:
    discover()
    return sorted(_registry[group])


def get(group: str, name: str) -> PluginInfo:
    """The choice `name` of `group`; an unknown name raises with the closest registered names."""
    discover()
    if group not in _registry:
        raise UnknownChoiceError("plugin group", group, ALL_GROUPS, what="name")
    try:
        return _registry[group][name]
    except KeyError:
        what = "plugin" if group in GROUPS else "choice"
        raise UnknownChoiceError(group, name, _registry[group], what=what) from None


def entries(group: str) -> dict[str, PluginInfo]:
    """Every choice of `group`, by name, in the order they were registered (which an
    adapter may rely on: Hugging Face types are guessed in it)."""
    discover()
    return dict(_registry[group])


def iter_plugins(groups: tuple[str, ...] = GROUPS) -> Iterator[PluginInfo]:
    """Every registered choice of `groups` (the component groups by default), group by group."""
    discover()
    for group in groups:
        for name in sorted(_registry[group]):
            yield _registry[group][name]


__all__ = [
    "GROUPS",
    "CHOICE_GROUPS",
    "ADAPTER_GROUPS",
    "ALL_GROUPS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "add",
    "register",
    "entries",
    "discover",
    "names",
    "get",
    "iter_plugins",
]
