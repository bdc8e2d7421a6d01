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
PLOTS = ("loss_curves.png", "final_val_loss.png", "tokens_per_s.png")


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


@pytest.mark.slow  # the fixture runs a 4-job sweep through the command line
def test_markdown_keeps_swept_columns_and_notes_the_rest_once(sweep_2x2):
    text = (sweep_2x2 / "report.md").read_text()
    rows = table(sweep_2x2)
    assert len(rows) == 4
    assert {"job", "attention", "norm", "held-out loss", "tokens/s"} <= set(rows[0])
    assert "task.steps" not in rows[0] and "status" not in rows[0]  # the same in every job
    same = same_values(text)  # the values in effect, each once
    assert same["task.steps"] == "2" and same["model"] == "tiny" and same["model.d_model"] == "64"
    assert same["task.seq_len"] == "16" and same["norm.eps"] == "1e-05"  # defaults in effect, not only overrides
    assert "attention" not in same and "attention.num_kv_heads" not in same
    assert [r["attention.num_kv_heads"] for r in rows] == ["4", "4", "1", "1"]  # mha on 4 heads, mqa
    measured = next(line for line in text.splitlines() if line.startswith("Measured, the same in every job"))
    assert "status `completed`" in measured
    by_choice = {(r["attention"], r["norm"]): r for r in rows}
    for row in csv_rows(sweep_2x2):
        assert by_choice[row["attention"], row["norm"]]["held-out loss"] == f"{float(row['held-out loss']):.4f}"


@pytest.mark.slow  # the fixture runs a 4-job sweep through the command line
def test_loss_curves_come_from_each_jobs_metrics(sweep_2x2):
    from llmarch_compose.sweep.report import collect

    jobs, swept = collect(sweep_2x2)
    # The declared sweeps, each followed by what its choice changed (layernorm has a bias and
    # an affine switch, rmsnorm neither; rmsnorm has an offset, layernorm none).
    assert swept == ["attention", "attention.num_kv_heads", "norm", "norm.bias", "norm.affine", "norm.offset"]
    for job in jobs:
        records = [json.loads(line) for line in (job.path / "metrics.jsonl").read_text().splitlines()]
        assert job.curve() == [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        assert [step for step, _ in job.curve()] == [0, 1, 2]
        assert job.curve("train_loss") == [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        assert [step for step, _ in job.curve("train_loss")] == [1, 2]


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


# ------------------------------------------------- values in effect, seeds as replicates, merging (fake jobs)

def fake_run(sweep: Path, number: int, overrides: dict, values: dict, figures: dict, curve=(), folder=None) -> Path:
    """A completed training job as Hydra and the run leave it: its overrides, and a summary
    with the values in effect (`settings`), the figures and a held-out curve."""
    job = sweep / (folder or str(number))
    (job / ".hydra").mkdir(parents=True)
    override_list = ", ".join(f"'{k}={v}'" for k, v in overrides.items())
    (job / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  mode: MULTIRUN\n  runtime:\n    choices: {task: train}\n"
        f"  overrides:\n    task: [{override_list}]\n  job:\n    num: {number}\n")
    summary = {"status": "completed", "settings": {"task": "train", **values}, **figures}
    (job / "summary.json").write_text(json.dumps(summary))
    (job / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v, "train_loss": v + 0.1}) + "\n"
                                               for s, v in curve))
    return job


def declare(sweep: Path, *overrides: str) -> None:
    """The sweep's multirun.yaml, with the swept overrides as typed."""
    sweep.mkdir(parents=True, exist_ok=True)
    (sweep / "multirun.yaml").write_text("hydra:\n  runtime:\n    choices: {task: train}\n  overrides:\n"
                                         f"    task: [{', '.join(repr(o) for o in overrides)}]\n")


#: The values in effect of an MHA and a GQA job on a 4-head model: MHA reads no model.n_kv_heads.
MHA = {"attention": "mha", "attention.num_kv_heads": 4, "model.d_model": 64, "model.n_heads": 4, "task.steps": 2}
GQA = {"attention": "gqa", "attention.num_kv_heads": 2, "model.n_kv_heads": 2, "model.d_model": 64,
       "model.n_heads": 4, "task.steps": 2}
#: Held-out losses by (attention, seed): MHA clearly lower than GQA.
LOSSES = {("mha", 0): 2.10, ("mha", 1): 2.14, ("mha", 2): 2.12, ("gqa", 0): 2.31, ("gqa", 1): 2.35, ("gqa", 2): 2.28}


def seeded_sweep(sweep: Path, seeds=(0, 1, 2), extra: dict = None) -> Path:
    """attention=mha,gqa x seeds, jobs numbered as Hydra would (attention outer)."""
    declare(sweep, "attention=mha,gqa", f"seed={','.join(map(str, seeds))}")
    number = 0
    for name, values in (("mha", MHA), ("gqa", GQA)):
        for seed in seeds:
            loss = LOSSES[name, seed]
            figures = {"final_val_loss": loss, "final_train_loss": loss - 0.05, "params_total": 1000 if name == "mha"
                       else 900, "tokens_per_s": 5000.0 + 10 * seed, "foreign_cpu_load": 0.02,
                       **(extra or {}).get((name, seed), {})}
            fake_run(sweep, number, {"attention": name, "seed": seed}, {**values, "seed": seed}, figures,
                     curve=[(0, 5.0 + seed / 10), (2, loss)])
            number += 1
    return sweep


def same_values(text: str) -> dict[str, str]:
    """key -> value of the "same in every job" list in report.md."""
    out = {}
    for line in text.splitlines():
        if line.startswith("- **"):
            for item in line.split("**: ", 1)[1].split("; "):
                key, _, value = item.partition(" `")
                out[key] = value.rstrip("`")
    return out


def t975(df: int) -> float:
    """Student t's 0.975 quantile (checked against its density in test_stats.py)."""
    from llmarch_compose.sweep.stats import t_quantile

    return t_quantile(0.975, df)


LOADED_GQA = {("gqa", 1): {"foreign_cpu_load": 0.35},  # measured on a loaded machine
              ("mha", 1): {"foreign_cpu_load": None, "foreign_cpu_load_measure": "unknown: /proc/stat not readable"}}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """attention=mha,gqa x 3 seeds, reported (gqa's seed 1 under foreign load, mha's seed 1 unknown)."""
    from llmarch_compose.sweep.report import write_report

    sweep = seeded_sweep(tmp_path_factory.mktemp("seeded"), extra=LOADED_GQA)
    write_report(sweep)
    return sweep


@pytest.fixture(scope="module")
def single_seed(tmp_path_factory) -> Path:
    from llmarch_compose.sweep.report import write_report

    sweep = seeded_sweep(tmp_path_factory.mktemp("single_seed"), seeds=(0,))
    write_report(sweep)
    return sweep


def markdown_rows(jobs, swept) -> list[dict[str, str]]:
    """The per-configuration table report.md would show, without writing (or plotting) anything."""
    from llmarch_compose.sweep.groups import configurations
    from llmarch_compose.sweep.report import configuration_columns

    columns = configuration_columns(configurations(jobs, swept), swept)
    return [{c.header: c.text[i] for c in columns} for i in range(len(columns[0].text))]


def test_seeds_are_replicates_one_row_per_configuration(seeded):
    import statistics

    rows = table(seeded)
    assert [(r["attention"], r["seeds"], r["jobs"]) for r in rows] == [("mha", "0, 1, 2", "0, 1, 2"),
                                                                        ("gqa", "0, 1, 2", "3, 4, 5")]
    assert "seed" not in rows[0]
    for row, name in zip(rows, ("mha", "gqa")):
        losses = [LOSSES[name, s] for s in range(3)]
        mean, sd = statistics.mean(losses), statistics.stdev(losses)
        half = t975(2) * sd / 3 ** 0.5
        assert row["held-out loss"] == f"{mean:.4f} ± {sd:.4f} [{mean - half:.4f} – {mean + half:.4f}]"
    # Equal over the seeds: the value alone; differing between configurations: a column.
    assert [r["parameters"] for r in rows] == ["1,000", "900"]
    assert rows[0]["tokens/s"] == "5,010 ± 10 [4,985 – 5,035]"

    per_seed = csv_rows(seeded)  # report.csv: one row per job, each seed's own figures
    assert [(r["job"], r["configuration"], r["attention"], r["seed"], float(r["held-out loss"])) for r in per_seed] \
        == [(str(i), str(1 + i // 3), a, str(s), LOSSES[a, s]) for i, (a, s) in enumerate(LOSSES)]
    with open(seeded / "report_configurations.csv", newline="") as f:
        configurations = list(csv.DictReader(f))
    assert [c["attention"] for c in configurations] == ["mha", "gqa"]
    mha = configurations[0]
    assert float(mha["held-out loss mean"]) == pytest.approx(statistics.mean(LOSSES["mha", s] for s in range(3)))
    assert float(mha["held-out loss sd"]) == pytest.approx(statistics.stdev(LOSSES["mha", s] for s in range(3)))
    assert mha["held-out loss n"] == "3" and mha["completed"] == "3" and mha["seeds"] == "0 1 2"
    for name in PLOTS:
        assert (seeded / name).read_bytes().startswith(PNG_MAGIC)


def test_the_difference_from_the_best_is_tested_with_welch(seeded):
    import mpmath

    rows = table(seeded)
    column = "differs from best (Welch t-test)"
    assert rows[0][column] == "best"
    a = [LOSSES["gqa", s] for s in range(3)]
    b = [LOSSES["mha", s] for s in range(3)]
    va, vb = [sum((x - sum(v) / 3) ** 2 for x in v) / 2 / 3 for v in (a, b)]
    t = (sum(a) / 3 - sum(b) / 3) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    density = lambda x: (mpmath.gamma((df + 1) / 2) / (mpmath.sqrt(df * mpmath.pi) * mpmath.gamma(df / 2))
                         * (1 + x * x / df) ** (-(df + 1) / 2))
    p = float(2 * mpmath.quad(density, [abs(t), mpmath.inf]))
    assert p < 0.05 and rows[1][column] == f"yes (p={p:.2g})"
    with open(seeded / "report_configurations.csv", newline="") as f:
        gqa = list(csv.DictReader(f))[1]
    assert float(gqa["Welch p"]) == pytest.approx(p, rel=1e-6) and float(gqa["Welch df"]) == pytest.approx(df)
    text = (seeded / "report.md").read_text()
    assert "Welch's two-sided t-test" in text and "p < 0.05" in text


def test_overlapping_seeds_do_not_differ_from_the_best(tmp_path):
    from llmarch_compose.sweep.report import collect

    close = {("gqa", s): {"final_val_loss": LOSSES["mha", s] + (0.01 if s == 1 else -0.005)} for s in range(3)}
    rows = markdown_rows(*collect(seeded_sweep(tmp_path, extra=close)))
    verdicts = [r["differs from best (Welch t-test)"] for r in rows]
    assert verdicts[0] == "best" and verdicts[1].startswith("no (p=")


def test_one_seed_per_configuration_keeps_one_row_per_job(single_seed):
    rows = table(single_seed)
    assert [(r["job"], r["attention"], r["held-out loss"]) for r in rows] == [("0", "mha", "2.1000"),
                                                                              ("1", "gqa", "2.3100")]
    text = (single_seed / "report.md").read_text()
    assert "±" not in text and "Welch" not in text and "replicates" not in text  # no made-up intervals
    assert not (single_seed / "report_configurations.csv").exists()


def test_the_table_compares_values_in_effect_not_overrides(single_seed):
    text = (single_seed / "report.md").read_text()
    rows = table(single_seed)
    # MHA ran with 4 key-value heads and read no model.n_kv_heads: both are columns, not "the same".
    assert [(r["attention.num_kv_heads"], r["model.n_kv_heads"]) for r in rows] == [("4", "—"), ("2", "2")]
    same = same_values(text)
    assert same["model.d_model"] == "64" and same["task.steps"] == "2" and same["model.n_heads"] == "4"
    assert "model.n_kv_heads" not in same and "attention.num_kv_heads" not in same
    assert all(key not in rows[0] for key in same)  # each value once: above the table or in it
    assert text.count("model.d_model") == 1


def test_a_failed_seed_joins_its_configuration_and_is_left_out_of_the_figures(tmp_path):
    from llmarch_compose.sweep.report import collect

    seeded_sweep(tmp_path)
    (tmp_path / "5" / "summary.json").unlink()  # gqa, seed 2 failed before it wrote a summary
    (tmp_path / "5" / "failure.json").write_text(json.dumps({"type": "RuntimeError", "message": "boom"}))
    rows = markdown_rows(*collect(tmp_path))
    assert rows[1]["jobs"] == "3, 4, 5" and rows[1]["status"] == "2 completed, 1 failed"
    assert rows[1]["error"] == "5: RuntimeError: boom"
    losses = [LOSSES["gqa", s] for s in (0, 1)]
    assert rows[1]["held-out loss"].startswith(f"{sum(losses) / 2:.4f} ± ")


def test_a_loaded_machine_marks_the_throughput(seeded):
    from llmarch_compose.sweep.report import collect

    rows = table(seeded)
    assert rows[1]["foreign CPU load"] == "35% ⚠ (seed 1)" and rows[1]["tokens/s"].endswith(" ⚠")
    assert rows[0]["foreign CPU load"] == "≤ 2%; seed 1 unknown" and not rows[0]["tokens/s"].endswith("⚠")
    text = (seeded / "report.md").read_text()
    assert "⚠ tokens/s measured while other processes used more than 10% of the machine's CPU" in text
    jobs = {j.id: j for j in collect(seeded)[0]}
    assert jobs["1"].foreign_text() == "unknown"  # never a made-up zero
    assert jobs["4"].foreign_text() == "35% ⚠" and jobs["0"].foreign_text() == "2%"
    assert [r["foreign_cpu_load"] for r in csv_rows(seeded)] == ["0.02", "", "0.02", "0.02", "0.35", "0.02"]


def test_plots_colour_by_configuration_with_spread_and_mark_the_load(seeded):
    from llmarch_compose.sweep.groups import configurations, replicated
    from llmarch_compose.sweep.plots import bars, loss_curves
    from llmarch_compose.sweep.report import collect, series

    jobs, swept = collect(seeded)
    groups = configurations(jobs, swept)
    assert replicated(groups)
    runs = series(groups, swept, ["attention", "seed"], grouped=True)
    assert [r.label for r in runs] == ["attention=mha", "attention=gqa"]

    fig = loss_curves(runs, grouped=True)
    train, val = fig.axes
    assert train.get_title() == "Train loss" and val.get_title() == "Held-out loss"
    lines = val.get_lines()
    assert len(lines) == 2 and lines[0].get_color() != lines[1].get_color()  # one colour per configuration
    assert [tuple(l.get_ydata()) for l in lines] == [
        pytest.approx((5.1, sum(LOSSES["mha", s] for s in range(3)) / 3)),
        pytest.approx((5.1, sum(LOSSES["gqa", s] for s in range(3)) / 3))]
    assert len(val.collections) == 2  # a band per configuration
    assert [l.get_color() for l in train.get_lines()] == [l.get_color() for l in lines]

    fig = bars(runs, "final_val_loss", "held-out loss", "final_val_loss.png")
    low, high = fig.axes[0].get_xlim()
    assert 2.0 < low < min(LOSSES.values()) and high > max(LOSSES.values())  # near the data, not from zero
    fig = bars(runs, "tokens_per_s", "tokens/s", "tokens_per_s.png", mark_load=True)
    hatches = [p.get_hatch() for p in fig.axes[0].patches]
    assert hatches == [None, "//"]
    assert "foreign CPU load 35%" in fig.axes[0].get_yticklabels()[1].get_text()


def report_task(**task):
    """Run task=report on a `task` node (no Hydra composition needed)."""
    from omegaconf import OmegaConf

    from llmarch_compose.plugin import registry

    return registry.get("task", "report").target(OmegaConf.create({"task": {"name": "report", **task}}))


def test_merged_sweeps_qualify_job_ids_and_the_merge_rebuilds(tmp_path):
    from llmarch_compose.sweep.report import SOURCES

    first, second, merged = tmp_path / "day1" / "gqa", tmp_path / "day2" / "mqa", tmp_path / "merged"
    seeded_sweep(first, seeds=(0, 1))
    declare(second, "attention=mqa", "seed=0,1")
    for seed in (0, 1):
        fake_run(second, seed, {"attention": "mqa", "seed": seed},
                 {**GQA, "attention": "mqa", "attention.num_kv_heads": 1, "model.n_kv_heads": None, "seed": seed},
                 {"final_val_loss": 2.5 + seed / 100})
    result = report_task(sweeps=[str(first), str(second)], output=str(merged))
    assert result["jobs"] == 6 and result["completed"] == 6
    rows = table(merged)
    assert [(r["attention"], r["jobs"]) for r in rows] == [
        ("mha", "gqa/0, gqa/1"), ("gqa", "gqa/2, gqa/3"), ("mqa", "mqa/0, mqa/1")]
    ids = [r["job"] for r in csv_rows(merged)]
    assert len(ids) == len(set(ids)) == 6
    assert json.loads((merged / SOURCES).read_text())["sweeps"] == [str(first), str(second)]
    text = (merged / "report.md").read_text()
    assert f"- `gqa`: `{first}`" in text and f"- `mqa`: `{second}`" in text
    (merged / "report.md").unlink()
    report_task(output=str(merged))  # the merge is remembered
    assert [r["jobs"] for r in table(merged)] == [r["jobs"] for r in rows]


def test_jobs_of_two_sweeps_in_one_folder_keep_apart(tmp_path):
    """Two sweeps written into one folder (hydra.sweep.subdir=<name>_${hydra.job.num}): both have a job 0."""
    from llmarch_compose.sweep.report import collect

    for name, values in (("mha", MHA), ("gqa", GQA)):
        fake_run(tmp_path, 0, {"attention": name}, values, {"final_val_loss": 2.0}, folder=f"{name}_0")
    assert sorted(j.id for j in collect(tmp_path)[0]) == ["gqa_0", "mha_0"]


def test_a_seed_run_twice_is_not_an_independent_replicate(tmp_path):
    from llmarch_compose.sweep.groups import configurations
    from llmarch_compose.sweep.report import collect_sweeps, render_markdown, swept_keys

    for sweep in ("a", "b"):  # the same job in two sweeps
        fake_run(tmp_path / sweep, 0, {"attention": "mha", "seed": 0}, {**MHA, "seed": 0}, {"final_val_loss": 2.0})
    fake_run(tmp_path / "b", 1, {"attention": "mha", "seed": 1}, {**MHA, "seed": 1}, {"final_val_loss": 2.1})
    jobs, declared = collect_sweeps([tmp_path / "a", tmp_path / "b"])
    swept = swept_keys(jobs, declared)
    groups = configurations(jobs, swept)
    assert [(c.seeds, [j.id for j in c.jobs]) for c in groups] == [(["0", "0", "1"], ["a/0", "b/0", "b/1"])]
    text = render_markdown(tmp_path, jobs, swept, [], [tmp_path / "a", tmp_path / "b"], groups)
    assert "Configuration 1 ran a seed more than once" in text


@pytest.mark.parametrize("sweeps, output, key", [
    (["{a}", "{a}"], "{tmp}/out", "task.sweeps"),  # a sweep twice: its rows twice
    (["{a}", "{b}"], "{a}", "task.output"),  # into a sweep's own folder
    (["{a}", "{tmp}/nothing"], "{tmp}/out", "task.sweeps[1]"),
    ([], "{tmp}/out", "task.sweeps"),
    (["{a}", "{b}"], None, "task.output"),
])
def test_report_task_refuses_a_merge_that_makes_no_sense(tmp_path, sweeps, output, key):
    fill = {"a": tmp_path / "a", "b": tmp_path / "b", "tmp": tmp_path}
    for sweep in (fill["a"], fill["b"]):
        fake_run(sweep, 0, {"attention": "mha"}, MHA, {"final_val_loss": 2.0})
    with pytest.raises(ConfigError) as info:
        report_task(sweeps=[s.format(**fill) for s in sweeps], output=output and output.format(**fill))
    assert info.value.key == key
    assert not (tmp_path / "out").exists() and not (tmp_path / "a" / "report.md").exists()


def test_a_run_records_the_values_in_effect():
    """From the resolved spec: the scale applied, each plugin's params, unread model numbers left out."""
    from llmarch_compose.config.in_effect import values_in_effect
    from llmarch_compose.config.spec import resolve_spec

    cfg = lc.compose(["model=llama2_7b", "scale=tiny", "attention=mha"])
    mha = values_in_effect(cfg, resolve_spec(cfg), seed=3)
    assert mha["attention"] == "mha" and mha["attention.num_kv_heads"] == mha["model.n_heads"] == 4
    assert "model.n_kv_heads" not in mha  # attention=mha reads no model.n_kv_heads (the preset says 32)
    assert cfg.model.d_model == 4096 and mha["model.d_model"] == 64  # scaled: what was built
    assert mha["model"] == "llama2_7b@tiny" and mha["ffn"] == "dense" and mha["seed"] == 3
    assert "model.n_experts" not in mha  # a dense model reads no expert count


@pytest.mark.slow
def test_a_seed_sweep_end_to_end_grouped_and_merged(tmp_path):
    """`llmarch -m attention=mha,gqa seed=0,1,2`: one row per configuration over its seeds, each
    seed in the CSV, the plots; then a second sweep (`task.replicates=2`) merged without repeated ids."""
    first_cwd, second_cwd = tmp_path / "first", tmp_path / "second"
    first_cwd.mkdir(), second_cwd.mkdir()
    proc = llmarch(["-m", "attention=mha,gqa", "seed=0,1,2", *TINY_JOB], first_cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(first_cwd).absolute()
    rows = table(sweep)
    assert [(r["attention"], r["attention.num_kv_heads"], r["seeds"], r["jobs"]) for r in rows] == [
        ("mha", "4", "0, 1, 2", "0, 1, 2"), ("gqa", "2", "0, 1, 2", "3, 4, 5")]
    per_seed = csv_rows(sweep)
    assert len(per_seed) == 6
    by_configuration = {}
    for row in per_seed:
        summary = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert float(row["held-out loss"]) == summary["final_val_loss"]
        assert row["seed"] == str(summary["settings"]["seed"])
        by_configuration.setdefault(row["configuration"], []).append(summary["final_val_loss"])
    import statistics

    for row, losses in zip(rows, by_configuration.values()):
        assert row["held-out loss"].startswith(f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f} [")
    assert rows[0]["differs from best (Welch t-test)"] == "best" or rows[1]["differs from best (Welch t-test)"] \
        == "best"
    for name in PLOTS:
        assert (sweep / name).read_bytes().startswith(PNG_MAGIC)
    text = (sweep / "report.md").read_text()
    same = same_values(text)
    assert same["model.d_model"] == "64" and same["task.steps"] == "2"
    assert text.count("model.d_model") == 1 and "model.n_kv_heads" not in same  # MHA reads none

    proc = llmarch(["-m", "attention=mqa", "task.replicates=2", *TINY_JOB], second_cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = only_sweep(second_cwd).absolute()
    assert [r["seed"] for r in csv_rows(second)] == ["0", "1"]
    merged = tmp_path / "merged"
    proc = llmarch(["task=report", f"task.sweeps=[{sweep},{second}]", f"task.output={merged}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 jobs: 8 completed" in proc.stdout
    ids = [r["job"] for r in csv_rows(merged)]
    assert len(ids) == len(set(ids)) == 8
    assert [r["attention"] for r in table(merged)] == ["mha", "gqa", "mqa"]
    assert all(r["jobs"].count("/") == len(r["seeds"].split(", ")) for r in table(merged))  # qualified ids


def test_a_matched_budget_shows_its_remaining_difference(tmp_path):
    """model.match: the moved dimension is a value in effect (a column where it differs), and each
    job's remaining difference from the target is a figure of its own."""
    from llmarch_compose.sweep.report import write_report

    sweep = tmp_path / "sweep"
    declare(sweep, "attention=mha,gqa", "model.match=params", "model.match_target=baseline")
    for number, (values, ffn, diff) in enumerate(((MHA, 704, 0.0), (GQA, 832, 0.25))):
        match = {"figure": "params", "by": "ffn_dim", "value": ffn, "difference_pct": diff}
        fake_run(sweep, number, {"attention": values["attention"]}, {**values, "model.ffn_dim": ffn},
                 {"final_val_loss": 2.0 + number, "params_total": 1000, "match": match})
    write_report(sweep)
    rows = {r["attention"]: r for r in csv_rows(sweep)}
    assert float(rows["mha"]["matched: difference from target (%)"]) == 0.0
    assert float(rows["gqa"]["matched: difference from target (%)"]) == 0.25
    shown = {r["attention"]: r["matched: difference from target (%)"] for r in table(sweep)}
    assert shown == {"mha": "+0.000", "gqa": "+0.250"}
    assert (rows["mha"]["model.ffn_dim"], rows["gqa"]["model.ffn_dim"]) == ("704", "832")
