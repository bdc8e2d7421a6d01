"""The `llmarch` command: a Hydra app over the packaged config tree.

Group choices are checked before Hydra composes, so a typo such as
`attention=gqq` ends in one paragraph that suggests `gqa`, not a traceback.

In a sweep (`llmarch -m ...`) a job that fails stays a failed job in Hydra's
sense (its exception leaves the task function), so every launcher and sweeper
sees it: the basic sweeper still runs the rest of the batch, Optuna marks the
trial failed. Such a job becomes a row of the sweep report, the other jobs
still report, and the command exits non-zero, naming the report. A training
job returns its final held-out loss, the objective a sweeper such as Optuna
minimizes.
"""

from __future__ import annotations

import sys
import textwrap
import traceback
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import hydra
from hydra import initialize_config_module
from hydra._internal.utils import get_args_parser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.plugins import Plugins
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from hydra_plugins.llmarch_compose_launcher import ProcessLauncher

from .config.compose import CONFIG_MODULE, CONFIG_NAME, CONFIG_PATH, VERSION_BASE, check
from .errors import LlmarchError
from .plugin import registry as plugins
from .sweep.callback import JobFailed, take_reports
from .sweep.replicates import expand_replicates
from .sweep.report import FAILED, INCOMPLETE, INTERRUPTED, NOT_STARTED
from .tasks import run_task
from .train import parallel

EXIT_USAGE = 2
EXIT_JOB_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 3

#: The summary field a sweep job returns to its sweeper.
OBJECTIVE = "final_val_loss"


def _report(exc: BaseException) -> None:
    print(f"llmarch: error: {exc}", file=sys.stderr)


def sweep_objective(result: Any) -> Any:
    """A training summary becomes its final held-out loss (a float, as Optuna requires);
    other results pass through."""
    if isinstance(result, Mapping) and isinstance(result.get(OBJECTIVE), (int, float)):
        return float(result[OBJECTIVE])
    return result


@hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base=VERSION_BASE)
def _app(cfg: DictConfig):
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        result = run_task(cfg, list(hydra_cfg.overrides.task))
    except LlmarchError as exc:
        _report(exc)
        if multirun:  # the job fails, the sweep goes on; Hydra prints the message, not a traceback
            raise JobFailed(str(exc)) from exc
        sys.exit(EXIT_USAGE)
    except Exception:  # not bad input but a bug: the traceback, and a word on what to do with it
        if multirun:
            raise
        traceback.print_exc()
        print("llmarch: internal error: this is a bug in llmarch_compose or a plugin, not a problem with "
              "your input; please report it with the command line and the traceback above", file=sys.stderr)
        sys.exit(EXIT_INTERNAL)
    return sweep_objective(result) if multirun else result


def _run_app() -> None:
    """Run the app; a sweep (`-m`, or hydra.mode=MULTIRUN) ends with its report, and the
    command exits non-zero if a job failed or the sweep was interrupted."""
    status: Any = 0
    try:
        _app()
    except SystemExit as exc:  # a usage error, or Hydra's exit(1) at the end of a sweep with a failed job
        status = exc.code
    except KeyboardInterrupt:
        status = EXIT_INTERRUPTED
    reports = take_reports(INTERRUPTED if status == EXIT_INTERRUPTED else FAILED)
    ending = "interrupted" if status == EXIT_INTERRUPTED else "error"
    for report in reports:
        failed = [job for job in report.jobs if job.status in (FAILED, INCOMPLETE, NOT_STARTED)]
        if failed:
            jobs = ", ".join(f"{job.id} ({job.status})" for job in failed)
            print(f"llmarch: {ending}: {len(failed)} of {len(report.jobs)} sweep jobs did not complete: job {jobs}; "
                  f"see {report.markdown}", file=sys.stderr)
            status = status or EXIT_JOB_FAILED
    if status == EXIT_INTERRUPTED and not reports:
        print("llmarch: interrupted", file=sys.stderr)
    if status:
        sys.exit(status)


EXAMPLES = (
    ("llmarch model=llama2_7b task=summary", "the architecture card of a preset (built on meta: no memory)"),
    ("llmarch model=llama3_8b attention=mqa norm=layernorm", "train a preset with two components swapped"),
    ("llmarch -m attention=mha,mqa,gqa task.steps=100", "an ablation sweep ending in one report"),
    ("llmarch -m attention=mha,gqa task.replicates=3", "each configuration with 3 seeds: mean, spread, test"),
)


def _summary_line(text: str) -> str:
    """A docstring's first clause, without the `task=name:` prefix a task's module docstring has."""
    text = text.strip().split(": ", 1)[-1] if text.startswith("`task=") else text.strip()
    for stop in (". ", "; ", ", with ", ", eager"):
        text = text.split(stop, 1)[0]
    return text.rstrip(".")


def help_text() -> str:
    """What `llmarch --help` prints: groups and their choices, the tasks, examples, the README."""
    plugins.discover()  # plugins and tasks store their nodes: the group listing includes them
    lines = ["llmarch: compose a transformer from plugins, then train, measure, export or describe it.", "",
             "usage: llmarch [-m] [group=choice ...] [key=value ...]", "", "Config groups (group=choice):"]
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
        loader = GlobalHydra.instance().config_loader()
        for group in (*plugins.GROUPS, "model", "scale", "data", "precision", "compile", "parallel", "logger"):
            choices = ", ".join(loader.get_group_options(group))
            lines += textwrap.wrap(choices, width=100, initial_indent=f"  {group:<11} ", subsequent_indent=" " * 14)
    GlobalHydra.instance().clear()
    lines += ["", "Tasks (task=name):"]
    for name, info in sorted(plugins.entries("task").items()):
        lines.append(f"  {name:<11} {_summary_line(info.doc)}")
    lines += ["", "Examples:"]
    lines += [f"  {command:<52} # {why}" for command, why in EXAMPLES]
    lines += ["", "Any key can be set (model.n_layers=4, task.steps=50); llmarch task=plugins lists every plugin",
              "with its parameters. The README in the project's source describes every group, task and preset.",
              "Hydra's own options: llmarch --hydra-help."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        try:
            print(help_text())
        except LlmarchError as exc:
            _report(exc)
            sys.exit(EXIT_USAGE)
        return
    # Hydra finds launchers by walking its `hydra_plugins` package, which cannot see the portion an
    # editable install adds: hydra/launcher=processes is registered by hand (harmless when also found).
    Plugins.instance().register(ProcessLauncher)
    try:
        sys.argv[1:] = expand_replicates(sys.argv[1:])  # task.replicates=N: a sweep over N seeds
        sys.argv += parallel.agree_on_run_folder(sys.argv[1:])  # torchrun's ranks share one run folder
        plugins.discover()
        args, _ = get_args_parser().parse_known_args(sys.argv[1:])
        check(args.overrides, config_dir=args.config_dir, config_path=args.config_path,
              config_name=args.config_name, multirun=args.multirun)
    except LlmarchError as exc:
        _report(exc)
        parallel.close_process_group()
        sys.exit(EXIT_USAGE)
    try:
        _run_app()
    finally:
        parallel.close_process_group()


if __name__ == "__main__":
    main()
