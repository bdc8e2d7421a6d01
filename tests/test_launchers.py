"""Sweeps through the optional launchers and sweeper (`pip install llmarch-compose[sweep]`):
joblib, submitit in its local mode, and Optuna. Each ends with the sweep report."""

from __future__ import annotations

import json

import pytest
import yaml

from test_report import TINY_JOB, csv_rows, llmarch, only_sweep, table

pytestmark = pytest.mark.slow  # every test runs a sweep in subprocesses


def test_joblib_launcher_runs_jobs_in_workers_and_reports(tmp_path):
    proc = llmarch(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "attention=mha,mqa", *TINY_JOB],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    sweep = only_sweep(tmp_path)
    rows = csv_rows(sweep)
    assert sorted(r["attention"] for r in rows) == ["mha", "mqa"]
    for row in rows:
        summary = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert summary["components"]["attention"] == row["attention"]
        assert float(row["held-out loss"]) == summary["final_val_loss"]


def test_submitit_local_launcher_records_a_failure_from_its_process(tmp_path):
    proc = llmarch(["-m", "hydra/launcher=submitit_local", "attention.num_kv_heads=2,3", *TINY_JOB], tmp_path)
    assert proc.returncode != 0
    sweep = only_sweep(tmp_path)
    assert (sweep / ".submitit").is_dir()  # the jobs ran as submitit jobs
    rows = {r["attention.num_kv_heads"]: r for r in table(sweep)}
    assert rows["2"]["status"] == "completed" and float(rows["2"]["held-out loss"]) > 0
    assert rows["3"]["status"] == "failed"
    assert "ConfigError: attention.num_kv_heads=3: must divide model.n_heads=4" in rows["3"]["error"]


def test_optuna_sweeper_minimizes_the_held_out_loss(tmp_path):
    proc = llmarch(["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0",
                    "attention=choice(mha,mqa)", *TINY_JOB], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    rows = csv_rows(sweep)
    assert len(rows) == 2 and {r["attention"] for r in rows} <= {"mha", "mqa"}
    losses = [json.loads((sweep / r["job"] / "summary.json").read_text())["final_val_loss"] for r in rows]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["best_value"] == min(losses)  # each trial's value was its job's held-out loss


#: A norm whose construction kills its own process when asked: a worker that dies
#: without a word (as on a signal or the out-of-memory killer).
KILLER_NORM = '''
import os
import signal
from dataclasses import dataclass

from torch import nn

from llmarch_compose import register


@dataclass
class KillerParams:
    die: bool = False


@register("norm", "killer", params=KillerParams)
class KillerNorm(nn.LayerNorm):
    def __init__(self, params, ctx, dim=None):
        if params.die:
            os.kill(os.getpid(), signal.SIGKILL)
        super().__init__(dim or ctx.model.d_model)
'''


def test_a_joblib_worker_that_dies_is_a_failed_row(tmp_path):
    from llmarch_compose.testing import run_llmarch, write_distribution

    site = tmp_path / "site"
    write_distribution(site, "killer-norm", {"killer_norm.py": KILLER_NORM}, {"killer": "killer_norm"})
    proc = run_llmarch(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "norm=killer",
                        "norm.die=false,true", *TINY_JOB], pythonpath=[site], cwd=tmp_path)
    assert proc.returncode != 0
    sweep = only_sweep(tmp_path).absolute()
    assert "did not complete" in proc.stderr and str(sweep / "report.md") in proc.stderr
    # A run's own record says false (JSON); a job that died is known by its override (True).
    rows = {r["norm.die"].lower(): r for r in csv_rows(sweep)}
    assert rows["true"]["status"] == "failed"
    assert rows["true"]["error"].startswith("ProcessDied: the job left neither a summary nor an error record")
    # The healthy sibling finished before the pool broke, was stopped with it (joblib's loky
    # backend ends every worker when one dies), or never began (a slow machine: the pool broke
    # before its worker took the job, so it has no folder). Each is a row that says so, and a
    # completed one has its figures.
    assert rows["false"]["status"] in ("completed", "failed", "not started")
    if rows["false"]["status"] == "completed":
        assert float(rows["false"]["held-out loss"]) > 0


def test_with_one_process_per_job_a_dying_job_fails_alone_and_its_siblings_finish(tmp_path):
    """hydra/launcher=processes: the killed job is a failed row naming the signal; the jobs beside it
    and after it complete, with their figures."""
    from llmarch_compose.testing import run_llmarch, write_distribution

    site = tmp_path / "site"
    write_distribution(site, "killer-norm", {"killer_norm.py": KILLER_NORM}, {"killer": "killer_norm"})
    proc = run_llmarch(["-m", "hydra/launcher=processes", "hydra.launcher.n_jobs=2", "norm=killer",
                        "norm.die=false,true,false", *TINY_JOB], pythonpath=[site], cwd=tmp_path)
    assert proc.returncode != 0
    sweep = only_sweep(tmp_path).absolute()
    assert "1 of 3 sweep jobs did not complete: job 1 (failed)" in proc.stderr, proc.stderr[-3000:]
    rows = csv_rows(sweep)
    assert [r["status"] for r in rows] == ["completed", "failed", "completed"], rows
    assert rows[1]["error"].startswith("ProcessDied: job 1 (norm=killer norm.die=True"), rows[1]["error"]
    assert "its process was killed by SIGKILL" in rows[1]["error"]
    for row in (rows[0], rows[2]):
        assert float(row["held-out loss"]) > 0
