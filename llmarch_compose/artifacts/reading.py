"""Reading config files that came with a folder someone else wrote: bounded in size,
JSON or YAML as plain data (no YAML aliases, whose expansion can be exponential), and
every failure an error that names the file rather than a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Union

import yaml
from omegaconf import DictConfig, OmegaConf

from ..errors import LlmarchError

MiB = 1 << 20
#: Far above any real config.json (DeepSeek-V3's is 2 KB) or resolved config.yaml.
JSON_LIMIT = 16 * MiB
YAML_LIMIT = 4 * MiB


class UnreadableFile(LlmarchError):
    """A file that is too large, malformed, or not what its name says."""


def read_text(file: Union[str, Path], limit: int, error: Callable[[str], Exception] = UnreadableFile) -> str:
    file = Path(file)
    try:
        with file.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise error(f"{file}: cannot be read ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise error(f"{file}: larger than {limit // MiB} MiB, more than any config holds")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{file}: not UTF-8 text") from None


def read_json(file: Union[str, Path], limit: int = JSON_LIMIT,
              error: Callable[[str], Exception] = UnreadableFile) -> Any:
    text = read_text(file, limit, error)
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{file}: nested too deeply to be a config") from None
    except ValueError as exc:
        raise error(f"{file}: not valid JSON ({exc})") from None


def read_yaml(file: Union[str, Path], limit: int = YAML_LIMIT,
              error: Callable[[str], Exception] = UnreadableFile) -> DictConfig:
    """A YAML mapping as a DictConfig, refusing anchors and aliases before anything expands."""
    text = read_text(file, limit, error)
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise error(f"{file}: YAML anchors and aliases are not read (a config is plain data)")
        cfg = OmegaConf.create(text)
    except yaml.YAMLError as exc:
        raise error(f"{file}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, DictConfig):
        raise error(f"{file}: not a YAML mapping")
    return cfg
