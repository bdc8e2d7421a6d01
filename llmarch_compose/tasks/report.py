"""`task=report task.output=<sweep folder>`: rebuild a sweep's report; with
`task.sweeps=[<sweep>,<sweep>,...]`, merge several sweeps into one report in `task.output`.

For a finished sweep, an interrupted one (its unfinished jobs show as
`incomplete`) or one still running. The report is rebuilt from the files the
jobs wrote; nothing of theirs is changed. A merged report lists its sweeps in
`report_sweeps.json`, so `task=report task.output=<that folder>` rebuilds it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig

from ..errors import ConfigError
from ..sweep.report import REPORTED_TASKS, STATUSES, is_sweep, read_sources, write_report
from ..config.structured import to_dataclass
from ..plugin.registry import register

WHAT_IS_VALID = "the folder of a sweep (Hydra's hydra.sweep.dir, e.g. multirun/<date>/<time>)"
WHAT_MERGES = "task.sweeps=[<sweep folder>,<sweep folder>] with task.output=<a folder for the merged report>"


@dataclass
class ReportTask:
    name: str = "report"
    # The sweep folder: its jobs are read, its report rewritten; with `sweeps`, where the merged report goes.
    output: Optional[str] = None
    sweeps: Optional[List[str]] = None  # sweep folders to merge into one report (job ids qualified by sweep)


def _sweep_folder(key: str, path: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ConfigError(key, path, "no such folder", WHAT_IS_VALID)
    if not is_sweep(folder):
        raise ConfigError(key, path, "holds no job of a sweep (a folder whose .hydra/hydra.yaml says mode MULTIRUN)",
                          WHAT_IS_VALID)
    return folder


def _merged_sweeps(task: ReportTask) -> Optional[list[Path]]:
    """The sweeps to merge, checked; None for the report of one sweep in its own folder."""
    if task.sweeps is None:
        output = Path(task.output).expanduser()
        return read_sources(output) if output.is_dir() and not is_sweep(output) else None
    if not task.sweeps:
        raise ConfigError("task.sweeps", [], "names no sweep", WHAT_MERGES)
    sweeps = [_sweep_folder(f"task.sweeps[{i}]", s) for i, s in enumerate(task.sweeps)]
    resolved = [s.resolve() for s in sweeps]
    if len(set(resolved)) < len(resolved):
        raise ConfigError("task.sweeps", task.sweeps, "names a sweep twice: its jobs would be rows twice", WHAT_MERGES)
    output = Path(task.output).expanduser()
    if output.resolve() in resolved or is_sweep(output):
        raise ConfigError("task.output", task.output, "is a sweep's own folder: a merged report would replace that "
                          "sweep's report", "a folder of its own for the merged report, e.g. reports/gqa_vs_mha")
    return sweeps


@register("task", "report", params=ReportTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(ReportTask, cfg.task, "task")
    if not task.output:
        raise ConfigError("task.output", task.output, "names the sweep to report on (or where a merged report goes)",
                          f"{WHAT_IS_VALID}; or {WHAT_MERGES}")
    sweeps = _merged_sweeps(task)
    output = Path(task.output).expanduser() if sweeps else _sweep_folder("task.output", task.output)
    report = write_report(output, sweeps)
    if not report.files:
        key = "task.sweeps" if sweeps else "task.output"
        raise ConfigError(key, task.sweeps if sweeps else task.output,
                          f"holds no job of a task that reports ({', '.join(REPORTED_TASKS)})", WHAT_IS_VALID)
    print(f"sweep report: {report.markdown} ({report.describe()})")
    return {"report": str(report.markdown), "jobs": len(report.jobs),
            **{status: report.count(status) for status in STATUSES}}
