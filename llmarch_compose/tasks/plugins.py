"""`task=plugins`: every registered plugin by group, with its parameters, defaults,
source distribution and one-line doc, and the YAML variants that build with it.

Defaults are shown as written: an interpolation reads `${model.n_kv_heads}`, not
the number a preset would give it. Two distributions registering one name fail
discovery (PluginConflictError) before anything is listed.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ..plugin import registry as plugins
from ..config.compose import CONFIG_MODULE, VERSION_BASE, compose
from ..errors import ConfigError, LlmarchError, UnknownChoiceError
from ..config.structured import to_dataclass
from ..plugin.registry import register

FORMATS = ("text", "json")


@dataclass
class PluginsTask:
    name: str = "plugins"
    format: str = "text"  # text | json
    group: Optional[str] = None  # list one group only


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, str):  # modules with `from __future__ import annotations`
        return annotation
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation).replace("typing.", "")


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default  # an interpolation is a string: shown as written
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"  # required: Hydra's mark for a missing value


def describe_params(params: type) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": _type_name(f.type), "default": _default(f)} for f in dataclasses.fields(params)]


@contextmanager
def _config_loader() -> Iterator[Any]:
    """Hydra's config loader over the packaged tree and every search-path plugin's folders."""
    owned = not GlobalHydra.instance().is_initialized()
    if owned:
        initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE).__enter__()
    try:
        yield GlobalHydra.instance().config_loader()
    finally:
        if owned:
            GlobalHydra.instance().clear()


def variants(groups: list[str]) -> dict[str, dict[str, Any]]:
    """group -> {"by_plugin": plugin -> [choice, ...], "broken": choice -> error} for the
    choices that are not plugin names themselves (YAML files that compose a plugin's node)."""
    with _config_loader() as loader:
        options = {g: sorted(loader.get_group_options(g)) for g in groups}
    out = {}
    for group in groups:
        by_plugin: dict[str, list[str]] = {}
        broken: dict[str, str] = {}
        for choice in options[group]:
            if choice in plugins.names(group):
                continue
            try:
                plugin = compose([f"{group}={choice}"])[group].plugin
            except LlmarchError as exc:
                broken[choice] = str(exc)
                continue
            by_plugin.setdefault(plugin, []).append(choice)
        out[group] = {"by_plugin": by_plugin, "broken": broken}
    return out


def listing(group: Optional[str] = None) -> dict[str, Any]:
    """{"groups": {group: [plugin, ...]}}; each plugin with its package, version, class,
    doc, params and variants. Raises PluginConflictError when two packages clash."""
    plugins.discover()
    if group is not None and group not in plugins.GROUPS:
        raise UnknownChoiceError("task.group", group, plugins.GROUPS, what="plugin group")
    groups = [group] if group is not None else list(plugins.GROUPS)
    found = variants(groups)
    out: dict[str, Any] = {}
    for g in groups:
        rows = []
        for name in plugins.names(g):
            info = plugins.get(g, name)
            rows.append({
                "name": name,
                "package": info.package,
                "version": info.version,
                "class": f"{info.cls.__module__}.{info.cls.__qualname__}",
                "doc": info.doc,
                "params": describe_params(info.params),
                "variants": found[g]["by_plugin"].get(name, []),
            })
        out[g] = rows
    broken = {g: found[g]["broken"] for g in groups if found[g]["broken"]}
    return {"groups": out, "broken_variants": broken}


def render_text(result: dict[str, Any]) -> str:
    lines = []
    for group, rows in result["groups"].items():
        lines.append(f"{group} ({len(rows)} plugin{'s' if len(rows) != 1 else ''})")
        for row in rows:
            source = row["package"] + (f" {row['version']}" if row["version"] else "")
            lines.append(f"  {row['name']}  [{source}]  {row['class']}")
            if row["doc"]:
                lines.append(f"      {row['doc']}")
            if row["variants"]:
                lines.append(f"      variants: {', '.join(row['variants'])}")
            for p in row["params"]:
                lines.append(f"      {p['name']}: {p['type']} = {p['default']}")
        for choice, error in result["broken_variants"].get(group, {}).items():
            lines.append(f"  (variant {choice} does not compose: {error})")
        lines.append("")
    return "\n".join(lines).rstrip()


@register("task", "plugins", params=PluginsTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(PluginsTask, cfg.task, "task")
    if task.format not in FORMATS:
        raise ConfigError("task.format", task.format, "unknown output format", FORMATS)
    result = listing(task.group)
    print(json.dumps(result, default=str) if task.format == "json" else render_text(result))
    return result
