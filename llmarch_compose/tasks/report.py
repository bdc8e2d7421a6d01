"""`task=report task.output=<sweep folder>`: rebuild a sweep's report.

For a finished sweep, an interrupted one (its unfinished jobs show as
`incomplete`) or one still running. The report is rebuilt from the files the
jobs wrote; nothing of theirs is changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig

from ..errors import ConfigError
from ..sweep.report import REPORTED_TASKS, STATUSES, is_sweep, write_report
from ..config.structured import to_dataclass
from ..plugin.registry import register

WHAT_IS_VALID = "the folder of a sweep (Hydra's hydra.sweep.dir, e.g. multirun/<date>/<time>)"


@dataclass
class ReportTask:
    name: str = "report"
    output: Optional[str] = None  # the sweep folder: its jobs are read, its report rewritten


@register("task", "report", params=ReportTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(ReportTask, cfg.task, "task")
    if not task.output:
        raise ConfigError("task.output", task.output, "names the sweep to report on", WHAT_IS_VALID)
    sweep_dir = Path(task.output).expanduser()
    if not sweep_dir.is_dir():
        raise ConfigError("task.output", task.output, "no such folder", WHAT_IS_VALID)
    if not is_sweep(sweep_dir):
        raise ConfigError("task.output", task.output, "holds no job of a sweep (a folder whose .hydra/hydra.yaml says mode MULTIRUN)",
                          WHAT_IS_VALID)
    report = write_report(sweep_dir)
    if not report.files:
        raise ConfigError("task.output", task.output, f"holds no job of a task that reports ({', '.join(REPORTED_TASKS)})",
                          WHAT_IS_VALID)
    print(f"sweep report: {report.markdown} ({report.describe()})")
    return {"report": str(report.markdown), "jobs": len(report.jobs),
            **{status: report.count(status) for status in STATUSES}}
