"""Adds this package's YAML variants (`llmarch_extras/conf`) to Hydra's config search path.

Hydra imports every module under the `hydra_plugins` namespace package and applies
each SearchPathPlugin it finds, for `llmarch` and `llmarch_compose.compose` alike.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class LlmarchExtrasSearchPath(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="llmarch-extras", path="pkg://llmarch_extras.conf")
