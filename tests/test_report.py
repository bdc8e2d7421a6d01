"""The sweep report: `llmarch -m ...` ends with report.md, report.csv and plots in
the sweep folder; failed and unfinished jobs are rows too; `task=report` rebuilds it.

The sweeps run the real command in a subprocess (as users do), with tiny jobs.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import llmarch_compose as lc
from conftest import TINY
from llmarch_compose.errors import ConfigError

BIN = Path(sys.executable).parent
LLMARCH = [str(BIN / "llmarch")] if (BIN / "llmarch").exists() else [sys.executable, "-m", "llmarch_compose"]

#: A training job of a few milliseconds (the byte-level data needs 256 token ids).
TINY_JOB = ["task=train", "task.steps=2", "task.eval_batches=1", "task.eval_every=1", "task.batch_size=2",
            "task.seq_len=16", "compile=eager", "task.checkpoint=false", "task.progress=false",
            # n_kv_heads is left to its default: sweeps over attention=mha,mqa would set a
            # number their plugin never reads, which the command line refuses.
            *(o for o in TINY if not o.startswith(("model.vocab_size=", "model.n_kv_heads=")))]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("val_loss_curves.png", "final_val_loss.png", "tokens_per_s.png")


def llmarch(args, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*LLMARCH, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def only_sweep(cwd: Path) -> Path:
    sweeps = list((cwd / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def csv_rows(sweep: Path) -> list[dict[str, str]]:
    with open(sweep / "report.csv", newline="") as f:
        return list(csv.DictReader(f))


def table(sweep: Path) -> list[dict[str, str]]:
    """The rows of the table in report.md, by header."""
    lines = [line for line in (sweep / "report.md").read_text().splitlines() if line.startswith("|")]
    split = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    header, body = split[0], split[2:]
    assert all(len(row) == len(header) for row in body), lines
    return [dict(zip(header, row)) for row in body]


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("sweep_2x2")
    proc = llmarch(["-m", "attention=mha,mqa", "norm=layernorm,rmsnorm", *TINY_JOB], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(cwd)
    assert f"sweep report: {sweep.absolute() / 'report.md'}" in proc.stdout
    return sweep


@pytest.mark.slow
def test_2x2_sweep_writes_one_report(sweep_2x2):
    sweep = sweep_2x2
    for name in ("report.md", "report.csv", *PLOTS):
        assert (sweep / name).is_file(), name
    for name in PLOTS:
        assert (sweep / name).read_bytes().startswith(PNG_MAGIC)
        assert f"]({name})" in (sweep / "report.md").read_text()  # the report links it

    rows = csv_rows(sweep)
    assert len(rows) == 4
    assert sorted((r["attention"], r["norm"]) for r in rows) == [
        ("mha", "layernorm"), ("mha", "rmsnorm"), ("mqa", "layernorm"), ("mqa", "rmsnorm")]
    for row in rows:  # each row holds what that job built and measured
        summary = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert summary["components"]["attention"] == row["attention"]
        assert summary["components"]["norm"] == row["norm"]
        assert row["status"] == "completed"
        assert float(row["held-out loss"]) == summary["final_val_loss"]
        assert float(row["train loss"]) == summary["final_train_loss"]
        assert float(row["tokens/s"]) == summary["tokens_per_s"]
        assert int(row["parameters"]) == summary["params_total"]
        assert int(row["active parameters"]) == summary["params_active"]
        assert float(row["wall time (s)"]) == summary["wall_s"]
        for header, key in (("KV cache bytes/token", "kv_cache_bytes_per_token"),
                            ("peak memory", "peak_memory_bytes"), ("held-out accuracy", "final_val_accuracy")):
            assert row[header] == ("" if summary.get(key) is None else str(summary[key]))
    kv = {r["attention"]: int(r["KV cache bytes/token"]) for r in rows if r["KV cache bytes/token"]}
    if kv:  # 4 heads against 1: MHA caches four times what MQA does
        assert kv["mha"] == 4 * kv["mqa"]


def test_markdown_keeps_swept_columns_and_notes_the_rest_once(sweep_2x2):
    text = (sweep_2x2 / "report.md").read_text()
    rows = table(sweep_2x2)
    assert len(rows) == 4
    assert {"job", "attention", "norm", "held-out loss", "tokens/s"} <= set(rows[0])
    assert "task.steps" not in rows[0] and "status" not in rows[0]  # the same in every job
    same = next(line for line in text.splitlines() if line.startswith("The same in every job"))
    assert "task.steps `2`" in same and "status `completed`" in same and "model `tiny`" in same
    assert "attention `" not in same
    by_choice = {(r["attention"], r["norm"]): r for r in rows}
    for row in csv_rows(sweep_2x2):
        assert by_choice[row["attention"], row["norm"]]["held-out loss"] == f"{float(row['held-out loss']):.4f}"


def test_loss_curves_come_from_each_jobs_metrics(sweep_2x2):
    from llmarch_compose.sweep.report import collect

    jobs, swept = collect(sweep_2x2)
    assert swept == ["attention", "norm"]
    for job in jobs:
        records = [json.loads(line) for line in (job.path / "metrics.jsonl").read_text().splitlines()]
        assert job.curve() == [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        assert [step for step, _ in job.curve()] == [0, 1, 2]


@pytest.mark.slow
def test_report_task_rebuilds_and_marks_an_unfinished_job(sweep_2x2, tmp_path):
    sweep = tmp_path / "copy"
    shutil.copytree(sweep_2x2, sweep)
    (sweep / "report.md").unlink()
    (sweep / "2" / "summary.json").unlink()  # as if the sweep stopped during job 2
    failure = {"type": "RuntimeError", "message": "a | b\nc"}  # a pipe and a line break in the table
    (sweep / "1" / "failure.json").write_text(json.dumps(failure))
    job_files = {p: p.read_bytes() for p in sweep.glob("[0-9]/**/*") if p.is_file()}

    proc = llmarch(["task=report", f"task.output={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 incomplete" in proc.stdout
    rows = {r["job"]: r for r in table(sweep)}
    assert {job: r["status"] for job, r in rows.items()} == {
        "0": "completed", "1": "failed", "2": "incomplete", "3": "completed"}
    assert rows["1"]["error"] == "RuntimeError: a \\| b c" and rows["0"]["error"] == ""
    incomplete = next(r for r in csv_rows(sweep) if r["job"] == "2")
    assert incomplete["held-out loss"] == "" and incomplete["attention"] == "mqa"
    assert {p: p.read_bytes() for p in sweep.glob("[0-9]/**/*") if p.is_file()} == job_files  # untouched


@pytest.mark.parametrize("path", [None, "does/not/exist", "."])
def test_report_task_needs_a_sweep_folder(path, tmp_path, monkeypatch):
    from llmarch_compose.tasks import run_task

    monkeypatch.chdir(tmp_path)  # "." holds no job folders
    cfg = lc.compose(["task=report"] + ([f"task.output={path}"] if path else []))
    with pytest.raises(ConfigError) as info:
        run_task(cfg)
    assert info.value.key == "task.output"
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_a_failed_job_is_a_row_with_its_message(tmp_path):
    proc = llmarch(["-m", "attention.num_kv_heads=2,3", *TINY_JOB], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    sweep = only_sweep(tmp_path).absolute()
    assert f"1 of 2 sweep jobs did not complete: job 1 (failed); see {sweep / 'report.md'}" in proc.stderr

    failure = json.loads((sweep / "1" / "failure.json").read_text())
    assert failure["type"] == "ConfigError"
    assert failure["message"].startswith("attention.num_kv_heads=3: must divide model.n_heads=4")
    assert not (sweep / "1" / "summary.json").exists()
    assert (sweep / "0" / "summary.json").is_file()  # the other job ran

    rows = {r["attention.num_kv_heads"]: r for r in table(sweep)}
    assert rows["2"]["status"] == "completed" and rows["2"]["error"] == ""
    assert rows["3"]["status"] == "failed" and rows["3"]["held-out loss"] == ""
    assert rows["3"]["error"] == f"ConfigError: {failure['message']}"


# ------------------------------------------------- jobs that died or never started (folders made here)

def fake_job(sweep: Path, number: int, attention: str, summary=None, failure=None) -> Path:
    """A job folder as Hydra and the training task leave it (summary and failure optional)."""
    job = sweep / str(number)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  mode: MULTIRUN\n  runtime:\n    choices: {task: train, attention: " + attention + "}\n"
        f"  overrides:\n    task: [attention={attention}]\n  job:\n    num: {number}\n")
    if summary is not None:
        (job / "summary.json").write_text(json.dumps(summary))
    if failure is not None:
        (job / "failure.json").write_text(json.dumps(failure))
    return job


DONE = {"status": "completed", "final_val_loss": 1.5}


@pytest.mark.parametrize("ended, status", [(None, "incomplete"), ("interrupted", "incomplete"), ("failed", "failed")])
def test_a_job_without_summary_or_failure_is_failed_once_the_sweep_failed(tmp_path, ended, status):
    from llmarch_compose.sweep.report import END, collect

    fake_job(tmp_path, 0, "mha", summary=DONE)
    fake_job(tmp_path, 1, "mqa")  # its process was killed: no summary, no failure.json
    if ended:
        (tmp_path / END).write_text(json.dumps({"ended": ended}))
    jobs, _ = collect(tmp_path)
    assert [(j.number, j.status) for j in jobs] == [(0, "completed"), (1, status)]
    assert ("ProcessDied: the job left neither a summary nor an error record" in jobs[1].error) == (status == "failed")


def test_planned_jobs_without_a_folder_are_not_started_rows(tmp_path):
    from llmarch_compose.sweep.report import PLAN, write_report

    plan = [["attention=mha"], ["attention=mqa"], ["attention=gqa"], ["attention=swa"]]
    (tmp_path / PLAN).write_text(json.dumps({"jobs": plan}))
    (tmp_path / "multirun.yaml").write_text("hydra:\n  runtime:\n    choices: {task: train}\n  overrides:\n"
                                            "    task: ['attention=mha,mqa,gqa,swa']\n")
    fake_job(tmp_path, 0, "mha", summary=DONE)
    fake_job(tmp_path, 1, "mqa", failure={"type": "ConfigError", "message": "bad"})
    report = write_report(tmp_path)
    assert report.describe() == "4 jobs: 1 completed, 1 failed, 2 not started"
    rows = table(tmp_path)
    assert [(r["job"], r["attention"], r["status"]) for r in rows] == [
        ("0", "mha", "completed"), ("1", "mqa", "failed"), ("2", "gqa", "not started"), ("3", "swa", "not started")]
    assert rows[2]["held-out loss"] == "" and rows[2]["error"] == ""


def test_the_plan_of_a_basic_sweep_is_its_jobs_in_order():
    from omegaconf import OmegaConf

    from llmarch_compose.sweep.callback import BASIC_SWEEPER, planned_jobs

    config = OmegaConf.create({"hydra": {
        "sweeper": {"_target_": BASIC_SWEEPER, "max_batch_size": None, "params": {"norm": "rmsnorm,layernorm"}},
        "overrides": {"task": ["attention=mha,mqa", "task.steps=2"]}}})
    assert planned_jobs(config) == [
        ["norm=rmsnorm", "attention=mha", "task.steps=2"], ["norm=rmsnorm", "attention=mqa", "task.steps=2"],
        ["norm=layernorm", "attention=mha", "task.steps=2"], ["norm=layernorm", "attention=mqa", "task.steps=2"]]
    config.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert planned_jobs(config) is None  # its trials are not known in advance


@pytest.mark.slow
def test_jobs_after_a_failed_batch_are_not_started_rows(tmp_path):
    proc = llmarch(["-m", "hydra.sweeper.max_batch_size=1", "attention.num_kv_heads=3,2", *TINY_JOB], tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    sweep = only_sweep(tmp_path).absolute()
    assert f"2 of 2 sweep jobs did not complete: job 0 (failed), 1 (not started); see {sweep / 'report.md'}" \
        in proc.stderr
    rows = {r["attention.num_kv_heads"]: r["status"] for r in table(sweep)}
    assert rows == {"3": "failed", "2": "not started"}
    assert not (sweep / "1").exists()
