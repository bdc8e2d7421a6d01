"""A sweep launcher whose jobs cannot take each other down: one process per job.

Hydra's basic launcher runs every job in the sweep's own process, and joblib's loky pool
stops every worker when one dies; either way a job killed by a signal or by the
out-of-memory killer ends the sweep. Here each job runs in a fresh process of its own
(spawned, never forked: the parent has imported torch), at most `n_jobs` at a time:

- a job that dies without a word becomes a failed job (`ProcessDied`, naming the signal
  or exit code), recorded through the sweep's callbacks like any failure, and the other
  jobs finish;
- a job's own exception travels back as its result, as with any launcher;
- on an interrupt the running jobs are stopped and the jobs not started stay not started.

Each job gets `cores // n_jobs` threads (at least one), so parallel jobs do not fight for
the cores. The class Hydra instantiates lives in `hydra_plugins.llmarch_compose_launcher`
(Hydra accepts launchers only from that package) and delegates here.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.errors import CompactHydraException
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict, read_write

log = logging.getLogger(__name__)

#: How often the parent looks at its children when nothing else wakes it (seconds).
POLL = 1.0


class ProcessDied(CompactHydraException):
    """A job whose process ended without returning: killed by a signal, or exited early."""


@dataclass
class ProcessLauncherConf:
    _target_: str = "hydra_plugins.llmarch_compose_launcher.ProcessLauncher"
    # Jobs running at once; -1: one per core.
    n_jobs: int = -1


def job_threads(n_jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // n_jobs)


def _sweep_config(hydra_context: HydraContext, config: DictConfig, overrides: Sequence[str], idx: int) -> DictConfig:
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
        sweep_config.hydra.job.num = idx
    return sweep_config


def _child(conn: Connection, payload: bytes, threads: int) -> None:
    """A job's process: the job, its result sent back (pickled by value, as loky does)."""
    import cloudpickle
    import torch

    torch.set_num_threads(threads)
    idx, overrides, hydra_context, config, task_function, singleton_state = cloudpickle.loads(payload)
    setup_globals()
    Singleton.set_state(singleton_state)
    sweep_config = _sweep_config(hydra_context, config, overrides, idx)
    HydraConfig.instance().set_config(sweep_config)
    ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=task_function,
                  job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    try:
        data = cloudpickle.dumps(ret)
    except Exception as exc:  # an exception that cannot travel: its type and message do
        ret._return_value = RuntimeError(f"{type(ret._return_value).__name__}: {ret._return_value} "
                                         f"(not picklable: {exc})")
        data = cloudpickle.dumps(ret)
    conn.send_bytes(data)
    conn.close()


def _ending(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        why = " (the out-of-memory killer sends it, as does kill -9)" if name == "SIGKILL" else ""
        return f"was killed by {name}{why}"
    return f"exited with code {exitcode} without a result"


@dataclass
class _Running:
    idx: int
    overrides: Sequence[str]
    process: Any
    conn: Connection
    sweep_config: DictConfig
    result: Optional[bytes] = None


def _dead_job(hydra_context: HydraContext, job: _Running) -> JobReturn:
    """The failed result of a job whose process returned nothing, recorded as a failure through
    the sweep's callbacks (the report's failure.json), as its own process would have."""
    output_dir = Path(str(job.sweep_config.hydra.sweep.dir)) / str(job.sweep_config.hydra.sweep.subdir)
    with read_write(job.sweep_config.hydra.runtime):
        job.sweep_config.hydra.runtime.output_dir = str(output_dir.absolute())
    ret = JobReturn(overrides=list(job.overrides), cfg=job.sweep_config, hydra_cfg=job.sweep_config,
                    working_dir=str(output_dir), task_name=str(job.sweep_config.hydra.job.name),
                    status=JobStatus.FAILED,
                    _return_value=ProcessDied(f"job {job.idx} ({' '.join(filter_overrides(job.overrides))}): its "
                                              f"process {_ending(job.process.exitcode)}"))
    hydra_context.callbacks.on_job_end(config=job.sweep_config, job_return=ret)
    return ret


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    import cloudpickle

    setup_globals()
    config: DictConfig = launcher.config
    hydra_context: HydraContext = launcher.hydra_context
    task_function: TaskFunction = launcher.task_function
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    n_jobs = launcher.n_jobs if launcher.n_jobs > 0 else (os.cpu_count() or 1)
    threads = job_threads(min(n_jobs, len(job_overrides)) or 1)
    log.info(f"Launching {len(job_overrides)} jobs, one process each, {n_jobs} at a time "
             f"({threads} thread(s) each); sweep output dir : {sweep_dir}")
    for idx, overrides in enumerate(job_overrides):
        log.info(f"\t#{initial_job_idx + idx} : {' '.join(filter_overrides(overrides))}")

    context = get_context("spawn")
    singleton_state = Singleton.get_state()
    waiting = list(enumerate(job_overrides))
    running: list[_Running] = []
    results: list[Optional[JobReturn]] = [None] * len(job_overrides)
    try:
        while waiting or running:
            while waiting and len(running) < n_jobs:
                slot, overrides = waiting.pop(0)
                idx = initial_job_idx + slot
                payload = cloudpickle.dumps((idx, overrides, hydra_context, config, task_function, singleton_state))
                parent_end, child_end = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(child_end, payload, threads), daemon=False)
                process.start()
                child_end.close()
                running.append(_Running(idx, overrides, process, parent_end,
                                        _sweep_config(hydra_context, config, overrides, idx)))
            wait([job.process.sentinel for job in running] + [job.conn for job in running if not job.conn.closed],
                 timeout=POLL)
            for job in list(running):
                if not job.conn.closed and job.conn.poll():
                    try:
                        job.result = job.conn.recv_bytes()
                    except EOFError:  # the process ended without sending
                        pass
                    job.conn.close()
                if job.process.is_alive():
                    continue
                job.process.join()
                running.remove(job)
                slot = job.idx - initial_job_idx
                results[slot] = cloudpickle.loads(job.result) if job.result is not None else \
                    _dead_job(hydra_context, job)
    finally:  # an interrupt: the running jobs stop with the sweep
        for job in running:
            job.process.terminate()
        for job in running:
            job.process.join(timeout=10)
    return [r for r in results if r is not None]
