"""The package list, computed: `conf/` and `registry/` live at the repository root
and install as `llmarch_compose.conf` and `llmarch_compose.registry`. Every folder
below them (and below `llmarch_compose/`) is a package, so a new config group,
plugin module or YAML file is in the wheel without editing any list."""

from setuptools import find_namespace_packages, setup

ROOTS = {"llmarch_compose": "llmarch_compose", "llmarch_compose.conf": "conf",
         "llmarch_compose.registry": "registry"}
# Hydra instantiates launchers only from its `hydra_plugins` namespace package: the sweep
# launcher's shim lives there (a portion of the namespace, not the package itself).
PLUGIN_ROOT = {"hydra_plugins": "hydra_plugins"}


def packages_under(name: str, folder: str) -> list[str]:
    found = find_namespace_packages(where=folder, exclude=["*__pycache__*"])
    return [name, *(f"{name}.{p}" for p in found)]


packages = sorted({p for name, folder in ROOTS.items() for p in packages_under(name, folder)})
packages += [f"hydra_plugins.{p}" for p in find_namespace_packages(where="hydra_plugins", exclude=["*__pycache__*"])]
setup(packages=packages, package_dir={**ROOTS, **PLUGIN_ROOT})
