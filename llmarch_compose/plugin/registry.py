"""The plugin registry: how components are registered, discovered and looked up.

A plugin is a params dataclass plus the module class it builds, registered with
`@register(group, name, params=...)`. Registration also stores the params in
Hydra's ConfigStore as `<group>/<name>`, so `attention=gqa` composes with or
without a YAML file. Configs select plugins by registry key only: nothing in a
config is ever imported by path.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..errors import ConfigError, LlmarchError, PluginConflictError, UnknownChoiceError
from ..config.structured import to_dataclass

#: The component groups a plugin can belong to, in build order.
GROUPS = ("position", "norm", "activation", "attention", "ffn", "topology")
#: The entry-point group through which built-in and third-party plugins are found.
ENTRY_POINT_GROUP = "llmarch_compose.plugins"
#: Keys every group node carries besides the plugin's own parameters.
RESERVED_KEYS = ("plugin", "name")


@dataclass(frozen=True)
class PluginInfo:
    group: str
    name: str
    cls: type
    params: type
    node: type  # the params dataclass plus the reserved keys, as stored in ConfigStore
    module: str
    package: str

    @property
    def doc(self) -> str:
        """The docstring's first paragraph on one line (docstrings here wrap their summary)."""
        paragraph = (self.cls.__doc__ or "").strip().split("\n\n")[0]
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


_registry: dict[str, dict[str, PluginInfo]] = {g: {} for g in GROUPS}
_loading_package: list[str] = []  # the distribution whose entry point is being loaded
_discovered = False
_discovery_error: LlmarchError | None = None  # kept so that every later lookup fails the same way


def register(group: str, name: str, params: type | None = None) -> Callable[[type], type]:
    """Class decorator: make `cls` the plugin `name` of `group`, configured by `params`."""
    if group not in GROUPS:
        raise UnknownChoiceError("plugin group", group, GROUPS, what="name")
    params = params or NoParams
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"params of {group}/{name} must be a dataclass, got {params!r}")
    clash = [f.name for f in dataclasses.fields(params) if f.name in RESERVED_KEYS]
    if clash:
        raise TypeError(f"params of {group}/{name} may not define the reserved keys {clash}")

    def decorate(cls: type) -> type:
        module = cls.__module__
        package = _loading_package[-1] if _loading_package else distribution_of(module)
        existing = _registry[group].get(name)
        if existing is not None and existing.module != module:
            raise PluginConflictError(
                f"{group} plugin {name!r} is registered twice: by {existing.package} "
                f"({existing.module}.{existing.cls.__name__}) and by {package} ({module}.{cls.__name__}); "
                "uninstall one or rename it"
            )
        node = dataclasses.make_dataclass(
            f"{params.__name__}Node",
            [("plugin", str, field(default=name)), ("name", str, field(default=name))],
            bases=(params,),
        )
        _registry[group][name] = PluginInfo(group, name, cls, params, node, module, package)
        ConfigStore.instance().store(group=group, name=name, node=node, provider=package)
        cls.plugin_group, cls.plugin_name, cls.params_class = group, name, params
        return cls

    return decorate


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
    if not any(_registry.values()):
        raise LlmarchError(
            f"no plugins are registered under the entry-point group {ENTRY_POINT_GROUP!r}; "
            "install the package (pip install -e .) so that its entry points exist"
        )


def names(group: str) -> list[str]:
    discover()
    return sorted(_registry[group])


def get(group: str, name: str) -> PluginInfo:
    """The plugin `name` of `group`; an unknown name raises with the closest registered names."""
    discover()
    if group not in _registry:
        raise UnknownChoiceError("plugin group", group, GROUPS, what="name")
    try:
        return _registry[group][name]
    except KeyError:
        raise UnknownChoiceError(group, name, _registry[group], what="plugin") from None


def iter_plugins() -> Iterator[PluginInfo]:
    discover()
    for group in GROUPS:
        for name in sorted(_registry[group]):
            yield _registry[group][name]


def make_params(group: str, node: DictConfig | Mapping[str, Any]) -> Any:
    """Turn a composed group node into the plugin's params dataclass (typed and checked)."""
    plugin_name = node.get("plugin") if node is not None else None
    if not plugin_name:
        raise ConfigError(f"{group}.plugin", plugin_name, "every group node names its plugin", names(group))
    info = get(group, plugin_name)
    return to_dataclass(info.node, node, group)


__all__ = [
    "GROUPS",
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "register",
    "discover",
    "names",
    "get",
    "iter_plugins",
    "make_params",
]
