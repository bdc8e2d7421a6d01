"""No failure destroys a good result: hyper-parameters are checked before training, a
diverging run stops and writes no weights, summary.json is valid JSON whatever
happened, checkpoints survive a kill at any point of a save, and a folder that holds
a run is not reused by accident."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose.artifacts import atomic
from llmarch_compose.artifacts.checkpoint import load_checkpoint, save_checkpoint

TINY_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
              "model.max_seq_len=32"]


# ------------------------------------------------------------- checkpoints survive a kill


class Killed(BaseException):
    """The process dies here: nothing after it runs, cleanup included."""


def kill_at(mp: pytest.MonkeyPatch, n: int) -> dict:
    """Make the n-th file-system step of a save (fsync, rename, exchange, removal) the
    last one the process takes; after it, every such step does nothing."""
    state = {"steps": 0, "killed": False}

    def wrap(fn):
        def step(*args, **kwargs):
            if state["killed"]:
                return None
            if state["steps"] == n:
                state["killed"] = True
                raise Killed
            state["steps"] += 1
            return fn(*args, **kwargs)
        return step

    for owner, name in [(os, "fsync"), (os, "replace"), (os, "unlink"), (shutil, "rmtree"), (atomic, "_exchange")]:
        mp.setattr(owner, name, wrap(getattr(owner, name)))
    return state


def weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def models():
    cfg = lc.compose(TINY_MODEL)
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        out.append(lc.build(cfg))
    return cfg, out


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_a_save_killed_at_any_step_leaves_a_complete_checkpoint(models, tmp_path, exchange):
    cfg, (first, second, third) = models
    path = tmp_path / "checkpoint"
    first_w, second_w, third_w = weights(first), weights(second), weights(third)
    outcomes = []
    for n in range(50):
        shutil.rmtree(tmp_path)
        save_checkpoint(first, cfg, path)
        with pytest.MonkeyPatch.context() as mp:
            if not exchange:
                mp.setattr(atomic, "_exchange", lambda a, b: False)
            state = kill_at(mp, n)
            try:
                save_checkpoint(second, cfg, path)
            except Killed:
                pass
        if not state["killed"]:
            break  # every step has been a kill point
        _, loaded = load_checkpoint(path)
        loaded_w = weights(loaded)
        assert same(loaded_w, first_w) or same(loaded_w, second_w), f"killed at step {n}: neither checkpoint"
        outcomes.append("new" if same(loaded_w, second_w) else "old")
        # The next save, by a process that finds this one's leftovers dead, cleans up.
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(atomic, "_alive", lambda pid: pid != os.getpid())
            save_checkpoint(third, cfg, path)
        assert sorted(os.listdir(tmp_path)) == ["checkpoint"], f"killed at step {n}: leftovers"
        assert same(weights(load_checkpoint(path)[1]), third_w)
    assert len(outcomes) >= 5, outcomes  # fsyncs, the publishing rename(s), the removal of the old one
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=lambda o: o == "new"), outcomes  # never back to the old one


def test_stale_temporary_folders_of_a_dead_writer_are_removed(models, tmp_path):
    cfg, (first, _, _) = models
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended
    (tmp_path / f".checkpoint.tmp-{pid}-abc").mkdir()
    (tmp_path / f".checkpoint.tmp-{pid}-abc" / "model.safetensors").write_bytes(b"half")
    live = tmp_path / f".checkpoint.tmp-{os.getpid()}-xyz"  # a save under way in a running process
    live.mkdir()
    save_checkpoint(first, cfg, tmp_path / "checkpoint")
    assert sorted(os.listdir(tmp_path)) == [live.name, "checkpoint"]


KILL_LOOP = textwrap.dedent("""
    import importlib.util, os, sys
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
    atomic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(atomic)
    if sys.argv[3] == "two-renames":
        atomic._exchange = lambda a, b: False
    out, i = Path(sys.argv[2]), 0
    while True:
        i += 1
        with atomic.atomic_folder(out) as tmp:
            (tmp / "weights").write_bytes(bytes([i % 256]) * 2**20)
            (tmp / "config").write_text(str(i))
        print(i, flush=True)
""")


@pytest.mark.parametrize("exchange", ["exchange", "two-renames"])
def test_a_real_kill_mid_save_leaves_a_complete_folder(tmp_path, exchange):
    out = tmp_path / "out"
    for delay in (0.0, 0.013, 0.037, 0.071):
        proc = subprocess.Popen([sys.executable, "-c", KILL_LOOP, atomic.__file__, str(out), exchange],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # one folder complete; now kill one mid-way
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        found = atomic.published(out)
        n = int((found / "config").read_text())
        assert (found / "weights").read_bytes() == bytes([n % 256]) * 2**20, delay
        with atomic.atomic_folder(out) as tmp:  # the next write removes what the killed one left
            (tmp / "config").write_text("0")
            (tmp / "weights").write_bytes(bytes(2**20))
        assert os.listdir(tmp_path) == ["out"]


# ------------------------------------------------------------- training that goes wrong

from llmarch_compose import ConfigError  # noqa: E402
from llmarch_compose.sweep import report  # noqa: E402
from llmarch_compose.tasks import train  # noqa: E402
from llmarch_compose.train import loop  # noqa: E402
from llmarch_compose.train.loop import TrainingDiverged  # noqa: E402

B = ["model.d_model=32", "model.n_layers=1", "task.steps=2", "task.batch_size=2", "task.seq_len=16", "compile=eager",
     "task.progress=false", "task.eval_batches=1"]


def train_cfg(out: Path, *extra: str):
    return lc.compose([*B, f"task.output={out}", *extra])


def strict_json(path: Path):
    """The file's JSON, refusing NaN and infinity (which json.loads accepts by default)."""
    def refuse(constant):
        raise ValueError(f"{path.name}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def metric_lines(out: Path) -> list[dict]:
    def refuse(constant):
        raise ValueError(f"metrics.jsonl: {constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()]


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


@pytest.mark.parametrize("override", ["task.lr=inf", "task.lr=nan", "task.lr=-1", "task.grad_clip=nan",
                                      "task.grad_clip=0", "task.grad_clip=-1", "task.weight_decay=nan",
                                      "task.weight_decay=-1", "task.warmup_steps=-5", "task.min_lr_ratio=-3",
                                      "task.min_lr_ratio=2", "task.beta1=2", "task.beta2=-0.1",
                                      "task.on_nonfinite=ignore"])
def test_hyper_parameters_are_checked_before_training(tmp_path, override):
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as info:
        train.run(train_cfg(out, override))
    assert info.value.key == override.split("=")[0]
    assert not out.exists()


def test_an_interrupt_before_a_steps_line_is_written_leaves_summary_and_log_agreeing(tmp_path, monkeypatch):
    # Ctrl-C after step 3 was counted but before its line reached metrics.jsonl.
    write = loop.MetricsLog.__call__

    def interrupted_before_step_3(self, record):
        if record["step"] == 3:
            raise KeyboardInterrupt
        write(self, record)

    monkeypatch.setattr(loop.MetricsLog, "__call__", interrupted_before_step_3)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.run(train_cfg(out, "task.steps=5", "task.checkpoint=false"))
    summary = strict_json(out / "summary.json")
    trained = [r for r in metric_lines(out) if "train_loss" in r]
    assert summary["status"] == "interrupted" and [r["step"] for r in trained] == [1, 2]
    assert summary["steps_completed"] == 2 and summary["final_train_loss"] == trained[-1]["train_loss"]


def test_no_clipping_is_allowed(tmp_path):
    assert train.run(train_cfg(tmp_path / "run", "task.grad_clip=inf", "task.checkpoint=false"))["status"] == "completed"


@pytest.fixture
def good_run(tmp_path):
    out = tmp_path / "D"
    summary = train.run(train_cfg(out))
    assert summary["status"] == "completed" and summary["checkpoint"] == str(out / "checkpoint")
    return out, files(out / "checkpoint")


def test_a_diverging_run_stops_and_keeps_the_good_checkpoint(good_run):
    out, checkpoint = good_run
    with pytest.raises(TrainingDiverged) as info:
        train.run(train_cfg(out, "task.lr=1e6", "task.steps=20", "task.overwrite=true"))
    message = str(info.value)
    assert f"step {info.value.step}" in message and "nan" in message.lower() and info.value.step > 1
    assert files(out / "checkpoint") == checkpoint  # the good weights are still there
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "diverged" and summary["diverged_at_step"] == info.value.step
    assert summary["checkpoint"] is None and summary["final_train_loss"] is None
    records = metric_lines(out)
    assert [r["step"] for r in records] == list(range(info.value.step + 1))  # the metrics so far, and the bad step
    assert records[-1]["diverged"] in ("train_loss", "loss", "grad_norm")
    assert sorted(os.listdir(out)) == ["checkpoint", "diagram.png", "diagram.svg", "metrics.jsonl", "summary.json"]


class GradNorms:
    """clip_grad_norm_ that reports `value` (and, with `raise_at`, raises) at chosen steps."""

    def __init__(self, mp, at=(), value=float("inf"), raise_at=None, error=None):
        self.real, self.calls, self.at, self.value = torch.nn.utils.clip_grad_norm_, 0, at, value
        self.raise_at, self.error = raise_at, error
        mp.setattr(torch.nn.utils, "clip_grad_norm_", self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.raise_at:
            raise self.error
        norm = self.real(*args, **kwargs)
        return torch.tensor(self.value) if self.calls in self.at else norm


def test_a_non_finite_gradient_norm_stops_with_the_step_and_value(tmp_path, monkeypatch):
    GradNorms(monkeypatch, at={2})
    with pytest.raises(TrainingDiverged, match=r"step 2: grad_norm=inf"):
        train.run(train_cfg(tmp_path / "run", "task.steps=4"))
    assert not (tmp_path / "run" / "checkpoint").exists()  # a diverged run writes no checkpoint
    assert strict_json(tmp_path / "run" / "summary.json")["diverged_at_step"] == 2


def test_skip_skips_the_update_and_counts_it(tmp_path, monkeypatch):
    GradNorms(monkeypatch, at={2, 3})
    summary = train.run(train_cfg(tmp_path / "run", "task.steps=4", "task.on_nonfinite=skip"))
    assert summary["status"] == "completed" and summary["skipped_steps"] == 2
    assert summary["tokens_trained"] == 2 * 2 * 16
    records = metric_lines(tmp_path / "run")
    assert [r.get("skipped", False) for r in records[1:]] == [False, True, True, False]
    assert records[2]["grad_norm"] is None  # infinity, as JSON has it: null
    assert (tmp_path / "run" / "checkpoint").is_dir()


def test_non_finite_weights_are_never_saved():
    model = lc.build(lc.compose(TINY_MODEL))
    loop.check_weights(model, 3)
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 3: weights"):
        loop.check_weights(model, 3)


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("disk on fire"), "failed")])
def test_summary_is_written_on_interrupt_and_failure(tmp_path, monkeypatch, error, status):
    GradNorms(monkeypatch, raise_at=3, error=error)
    out = tmp_path / "run"
    with pytest.raises(type(error)):
        train.run(train_cfg(out, "task.steps=5"))
    summary = strict_json(out / "summary.json")
    assert summary["status"] == status and summary["steps_completed"] == 2
    assert summary["checkpoint"] is None and not (out / "checkpoint").exists()
    assert summary["initial_val_loss"] is not None and summary["final_train_loss"] is not None
    assert [r["step"] for r in metric_lines(out)] == [0, 1, 2]  # the metrics so far are kept
    if status == "failed":
        assert summary["error"] == "RuntimeError: disk on fire"


def test_json_never_holds_nan():
    text = loop.to_json({"a": float("nan"), "b": [float("inf"), 1.0], "c": {"d": -float("inf")}})
    assert json.loads(text) == {"a": None, "b": [None, 1.0], "c": {"d": None}}


# ------------------------------------------------------------- a folder that holds a run


@pytest.mark.parametrize("leftover", ["summary.json", "metrics.jsonl", "checkpoint"])
def test_a_folder_holding_a_run_is_refused(tmp_path, leftover):
    out = tmp_path / "D"
    (out / leftover).mkdir(parents=True) if leftover == "checkpoint" else (out.mkdir(), (out / leftover).write_text("{}"))
    before = sorted(os.listdir(out))
    with pytest.raises(ConfigError) as info:
        train.run(train_cfg(out))
    assert info.value.key == "task.output" and leftover in str(info.value) and "task.overwrite=true" in str(info.value)
    assert sorted(os.listdir(out)) == before


def test_an_empty_folder_is_used_and_overwrite_replaces_a_run(tmp_path):
    out = tmp_path / "D"
    out.mkdir()
    first = train.run(train_cfg(out, "task.checkpoint=false"))
    second = train.run(train_cfg(out, "task.overwrite=true", "task.steps=3", "task.checkpoint=false"))
    assert first["steps"] == 2 and strict_json(out / "summary.json")["steps"] == second["steps"] == 3
    assert [r["step"] for r in metric_lines(out)] == [0, 1, 2, 3]


# ------------------------------------------------------------- the sweep report


def sweep_job(folder: Path, summary=None) -> Path:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "hydra.yaml").write_text(
        "hydra:\n  mode: MULTIRUN\n  runtime:\n    choices:\n      task: train\n"
        f"  overrides:\n    task:\n    - task.lr={folder.name}\n  job:\n    num: {folder.name}\n")
    if summary is not None:
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_report_reads_how_a_run_ended(tmp_path):
    jobs = {"0": {"status": "completed", "final_val_loss": 1.0}, "1": {"status": "diverged", "error": "step 4: nan"},
            "2": {"status": "interrupted"}, "3": {"status": "failed", "error": "RuntimeError: x"},
            "4": {"final_val_loss": 2.0}}  # a summary from before `status`
    for name, summary in jobs.items():
        sweep_job(tmp_path / name, summary)
    read = {job.path.name: job for job in report.collect(tmp_path)[0]}
    assert {k: j.status for k, j in read.items()} == {"0": "completed", "1": "failed", "2": "incomplete",
                                                     "3": "failed", "4": "completed"}
    assert read["1"].error == "step 4: nan" and read["0"].error == ""


# ------------------------------------------------------------- the command line


def llmarch(args, cwd, **kwargs):
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": os.environ.get("TORCHINDUCTOR_CACHE_DIR", str(cwd / ".ind"))}
    return subprocess.Popen([sys.executable, "-m", "llmarch_compose.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.slow
def test_ctrl_c_exits_130_with_an_interrupted_summary(tmp_path):
    out = tmp_path / "D"
    # SIGINT as a terminal delivers it: a suite started in the background (`pytest &`) passes
    # its children SIGINT ignored, and Python then leaves it ignored.
    proc = llmarch([*B, "task.steps=100000", "task.eval_every=100000", f"task.output={out}"], tmp_path,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and len(metric_lines(out) if (out / "metrics.jsonl").exists() else []) < 3:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()  # never a 100000-step run left behind
    assert proc.returncode == 130, stderr[-2000:]
    summary = strict_json(out / "summary.json")
    assert summary["status"] == "interrupted" and summary["steps_completed"] >= 2
    assert not (out / "checkpoint").exists()
    assert len(metric_lines(out)) >= summary["steps_completed"] + 1


@pytest.mark.slow
def test_hydra_run_directory_needs_no_flag(tmp_path):
    for _ in range(2):
        proc = llmarch([*B, "task.checkpoint=false"], tmp_path)
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-2000:]
    assert len(list((tmp_path / "outputs").glob("*/*/summary.json"))) == 2
