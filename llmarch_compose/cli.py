"""The `llmarch` command: a Hydra app over the packaged config tree.

Group choices are checked before Hydra composes, so a typo such as
`attention=gqq` ends in one paragraph that suggests `gqa`, not a traceback.
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from . import plugins
from .config import CONFIG_NAME, CONFIG_PATH, VERSION_BASE, check
from .errors import LlmarchError

EXIT_USAGE = 2


def _report(exc: BaseException) -> None:
    print(f"llmarch: error: {exc}", file=sys.stderr)


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=VERSION_BASE)
def _app(cfg: DictConfig):
    from .tasks import run_task

    try:
        return run_task(cfg)
    except LlmarchError as exc:
        _report(exc)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records the failed job and goes on with the others
        sys.exit(EXIT_USAGE)


def main(argv: Optional[Sequence[str]] = None) -> None:
    from hydra._internal.utils import get_args_parser

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        plugins.discover()
        args, _ = get_args_parser().parse_known_args(sys.argv[1:])
        check(args.overrides)
    except LlmarchError as exc:
        _report(exc)
        sys.exit(EXIT_USAGE)
    _app()


if __name__ == "__main__":
    main()
