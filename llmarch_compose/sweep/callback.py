"""The Hydra callback behind the sweep report (registered in conf/config.yaml).

- `on_job_end`: a failed job leaves `failure.json` (exception type and message)
  in its own folder, wherever the launcher ran it (a joblib worker, a submitit
  process): the report reads files, not return values.
- `on_multirun_start` / `on_multirun_end`: the sweep folder is remembered, then
  reported on.

Hydra calls `on_multirun_end` only when every job succeeded: the sweeper
re-raises the first failed job's exception once the batch has run (Hydra 1.3,
`BasicSweeper.sweep`), and an interrupted sweep never gets there. The command
line therefore calls `take_reports()` after every sweep, which also writes the
report of a sweep that was started and not ended.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..artifacts.atomic import write_atomic
from ..plugin.registry import add
from .report import FAILURE, SweepReport, write_report


class JobFailed(CompactHydraException):
    """A job's error that the user can fix. Hydra prints it as one paragraph at the
    end of the sweep instead of a traceback; `failure.json` records the cause."""


_open_sweeps: list[Path] = []  # started, report not yet written
_written: list[SweepReport] = []  # written since the last take_reports()


def failure_record(job_return: JobReturn) -> dict[str, Any]:
    # `_return_value` holds the exception; the `return_value` property would re-raise it.
    exc = job_return._return_value
    if isinstance(exc, JobFailed) and exc.__cause__ is not None:
        exc = exc.__cause__
    return {"type": type(exc).__name__, "message": str(exc), "overrides": list(job_return.overrides or [])}


def report_on(sweep_dir: Path) -> SweepReport:
    if sweep_dir in _open_sweeps:
        _open_sweeps.remove(sweep_dir)
    report = write_report(sweep_dir)
    if report.files:
        _written.append(report)
        print(f"sweep report: {report.markdown} ({report.describe()})", flush=True)
    return report


def take_reports() -> list[SweepReport]:
    """Every report written in this process since the last call, after writing the
    reports of sweeps that Hydra started but did not end (a failed job, an interrupt)."""
    for sweep_dir in list(_open_sweeps):
        report_on(sweep_dir)
    reports = list(_written)
    _written.clear()
    return reports


class SweepReportCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _open_sweeps.append(Path(config.hydra.sweep.dir).absolute())

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            out = Path(config.hydra.runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / FAILURE, json.dumps(failure_record(job_return), indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_on(Path(config.hydra.sweep.dir).absolute())


# The one callback conf/config.yaml names: hydra.callbacks accepts registered callbacks only.
add("hydra_callback", "sweep_report", SweepReportCallback)
