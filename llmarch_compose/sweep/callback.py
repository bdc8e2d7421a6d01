"""The Hydra callback behind the sweep report (registered in conf/config.yaml).

- `on_job_end`: a failed job leaves `failure.json` (exception type and message)
  in its own folder, wherever the launcher ran it (a joblib worker, a submitit
  process): the report reads files, not return values.
- `on_multirun_start` / `on_multirun_end`: the sweep folder is remembered, then
  reported on. At the start, for Hydra's basic sweeper, every job the sweep will
  run is listed in `sweep_plan.json`, so jobs that never start (a failed batch
  stops the sweep; an interrupt; a dead worker) are rows of the report too.

Hydra calls `on_multirun_end` only when every job succeeded: the sweeper
re-raises the first failed job's exception once the batch has run (Hydra 1.3,
`BasicSweeper.sweep`), and an interrupted sweep never gets there. The command
line therefore calls `take_reports(ending)` after every sweep, which also writes the
report of a sweep that was started and not ended, recording how it ended in
`sweep_end.json`: a job that left neither a summary nor `failure.json` in a sweep
that ended in a failure had its process killed (a dead worker), and is a failed row.

A sweep whose jobs match a budget to `model.match_target=baseline` gets the figures of
its first job in `match_baseline.json` at the start, before any job runs, so that jobs
in any process read the same numbers (config/match.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.global_hydra import GlobalHydra
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import CompactHydraException, HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..artifacts.atomic import write_atomic
from ..config import match
from ..config.compose import with_checkpoint
from ..errors import LlmarchError
from ..plugin.registry import add
from .report import END, FAILED, FAILURE, PLAN, SweepReport, write_report


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


BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__qualname__}"


def planned_jobs(config: DictConfig) -> Optional[list[list[str]]]:
    """The overrides of every job Hydra's basic sweeper will run, in job order (None for
    another sweeper, whose jobs are not known in advance)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    params = sweeper.get("params")
    params = [f"{k}={v}" for k, v in (OmegaConf.to_container(params) if params else {}).items()]
    try:
        overrides = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
        batches = BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size"))
    except (HydraException, ValueError):  # a sweep this parser cannot expand alone (a glob over groups)
        return None
    return [list(job) for batch in batches for job in batch]


def record_match_baseline(sweep_dir: Path, config: DictConfig, plan: Optional[list[list[str]]]) -> None:
    """Where the sweep's jobs match to `baseline`, the figures of its first job's model,
    composed from that job's overrides as its own process will compose them."""
    (sweep_dir / match.BASELINE_FILE).unlink(missing_ok=True)  # an earlier sweep's, in a reused folder
    if not plan or not match.needs_baseline(plan, config):
        return
    try:
        job_cfg = GlobalHydra.instance().config_loader().load_sweep_config(config, list(plan[0]))
        with read_write(job_cfg), open_dict(job_cfg):
            del job_cfg["hydra"]
        job_cfg = with_checkpoint(job_cfg, plan[0])
    except (HydraException, LlmarchError) as exc:
        match.write_baseline(sweep_dir, plan[0], None, f"{type(exc).__name__}: {exc}")
        return
    match.write_baseline(sweep_dir, plan[0], job_cfg)


def report_on(sweep_dir: Path, ending: Optional[str] = None) -> SweepReport:
    """Write the sweep's report; `ending` (failed, interrupted), for a sweep Hydra did not
    end, is recorded first so that the report, and any rebuilt later, reads it."""
    if ending is not None and sweep_dir.is_dir():
        write_atomic(sweep_dir / END, json.dumps({"ended": ending}) + "\n")
    if sweep_dir in _open_sweeps:
        _open_sweeps.remove(sweep_dir)
    report = write_report(sweep_dir)
    if report.files:
        _written.append(report)
        print(f"sweep report: {report.markdown} ({report.describe()})", flush=True)
    return report


def take_reports(ending: str = FAILED) -> list[SweepReport]:
    """Every report written in this process since the last call, after writing the
    reports of sweeps that Hydra started but did not end (`ending`: a failed job or a
    dead worker, `failed`; an interrupt, `interrupted`)."""
    for sweep_dir in list(_open_sweeps):
        report_on(sweep_dir, ending)
    reports = list(_written)
    _written.clear()
    return reports


class SweepReportCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).absolute()
        _open_sweeps.append(sweep_dir)
        if (sweep_dir / END).exists():  # an earlier sweep's ending, in a reused sweep folder
            (sweep_dir / END).unlink()
        plan = planned_jobs(config)
        if plan is not None:
            sweep_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(sweep_dir / PLAN, json.dumps({"jobs": plan}, indent=1) + "\n")
        record_match_baseline(sweep_dir, config, plan)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status == JobStatus.FAILED:
            out = Path(config.hydra.runtime.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            write_atomic(out / FAILURE, json.dumps(failure_record(job_return), indent=2) + "\n")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        report_on(Path(config.hydra.sweep.dir).absolute())


# The one callback conf/config.yaml names: hydra.callbacks accepts registered callbacks only.
add("hydra_callback", "sweep_report", SweepReportCallback)
