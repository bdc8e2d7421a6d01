"""Checkpoints a run resumes from (task.checkpoint_every, task.resume): a run stopped and
resumed writes the metrics of the run that never stopped, bit for bit; a save that dies
midway leaves the previous checkpoint the newest; bad input is refused before training;
gradient accumulation trains on the rows of the larger batch."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.artifacts.checkpoint import load_checkpoint
from llmarch_compose.tasks import train
from llmarch_compose.train import folder_lock, loop, resume
from llmarch_compose.train.loop import TrainingDiverged

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
         "model.max_seq_len=32", "compile=eager"]
STEPS = 8
RUN = [f"task.steps={STEPS}", "task.batch_size=2", "task.seq_len=16", "task.warmup_steps=2", "task.eval_every=2",
       "task.eval_batches=1", "task.progress=false"]


def run_in_process(out: Path, *extra: str) -> dict:
    return train.run(lc.compose([*SMALL, *RUN, f"task.output={out}", *extra]))


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def curve(out: Path) -> list[tuple]:
    """(step, train loss, held-out loss) of every record: what must repeat exactly."""
    return [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records(out)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_in_process(out)
    return out


def interrupt_after_step(monkeypatch, step: int) -> None:
    """Ctrl-C once the log has written `step`'s record."""
    write = loop.MetricsLog.__call__

    def writing_then_interrupted(self, record):
        write(self, record)
        if record["step"] == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop.MetricsLog, "__call__", writing_then_interrupted)


def test_stopped_and_resumed_run_repeats_the_uninterrupted_metrics(uninterrupted, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_after_step(patch, 5)
        with pytest.raises(KeyboardInterrupt):
            run_in_process(out, "task.checkpoint_every=2")
    assert json.loads((out / "summary.json").read_text())["steps_completed"] == 5
    assert [p.name for p in resume.complete_checkpoints(out)] == ["step_00000002", "step_00000004"]
    summary = run_in_process(out, "task.resume=auto", "task.checkpoint_every=2")
    assert curve(out) == curve(uninterrupted)  # bitwise: step 5 is trained again from the step-4 checkpoint
    assert summary["status"] == "completed" and summary["steps_completed"] == STEPS
    expected = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["final_val_loss"] == expected["final_val_loss"]
    assert summary["initial_val_loss"] == expected["initial_val_loss"]  # carried over from the first part's log
    # The consolidated weights equal the uninterrupted run's.
    _, resumed_model = load_checkpoint(out / "checkpoint")
    _, reference = load_checkpoint(uninterrupted / "checkpoint")
    for (name, a), (_, b) in zip(resumed_model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_keep_checkpoints_keeps_the_newest(tmp_path):
    run_in_process(tmp_path, "task.steps=5", "task.checkpoint_every=1", "task.keep_checkpoints=2")
    assert [p.name for p in resume.complete_checkpoints(tmp_path)] == ["step_00000004", "step_00000005"]
    trainer = json.loads((tmp_path / "checkpoints/step_00000005/trainer.json").read_text())
    assert trainer["step"] == 5 and trainer["progress"]["steps_done"] == 5


def test_a_save_killed_midway_leaves_the_previous_checkpoint(uninterrupted, tmp_path, monkeypatch):
    """The third save dies after writing part of its shards (as a kill would leave them)."""
    real_save, calls = dcp.save, []

    def dying_save(state, checkpoint_id):
        calls.append(checkpoint_id)
        if len(calls) == 3:
            Path(checkpoint_id, "__0_0.distcp").write_bytes(b"\0" * 100)
            raise KeyboardInterrupt
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_in_process(tmp_path, "task.checkpoint_every=2")
    assert [p.name for p in resume.complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]
    assert (tmp_path / "checkpoints/.step_00000006.partial").is_dir()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(dcp, "save", real_save)
    run_in_process(tmp_path, "task.resume=auto", "task.checkpoint_every=2")
    assert curve(tmp_path) == curve(uninterrupted)
    assert not list((tmp_path / "checkpoints").glob(".*.partial"))  # the next save removed what the dead one left


def test_resume_names_a_checkpoint_folder_or_a_run_folder(tmp_path):
    run_in_process(tmp_path / "a", "task.steps=4", "task.checkpoint_every=2")
    newest = tmp_path / "a/checkpoints/step_00000004"
    assert resume.resolve(str(tmp_path / "a"), tmp_path / "b") == newest
    assert resume.resolve(str(tmp_path / "a/checkpoints/step_00000002"), tmp_path / "b").name == "step_00000002"
    assert resume.resolve("auto", tmp_path / "empty") is None  # nothing to continue yet: a fresh start
    assert resume.resolve(None, tmp_path / "a") is None
    # Into another folder: the run continues there, its log carried over up to the checkpoint.
    summary = run_in_process(tmp_path / "b", f"task.resume={newest}")
    assert summary["steps_completed"] == STEPS
    assert [r["step"] for r in records(tmp_path / "b")][:4] == [0, 1, 2, 3]


def test_a_folder_another_live_run_writes_into_is_refused(tmp_path):
    """A resume launched while the folder's run still lives would mix the two runs' logs
    and checkpoints; it is refused, naming the holder, and the folder is left as it was."""
    run_in_process(tmp_path, "task.steps=4", "task.checkpoint_every=2")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with folder_lock.hold(tmp_path):  # the live run (a lock is per open file, so this process conflicts too)
        with pytest.raises(ConfigError, match=rf"task.output=.*another run is writing into this folder "
                                              rf"\(pid {os.getpid()}\).*Valid: wait for that run"):
            run_in_process(tmp_path, "task.steps=6", "task.resume=auto")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    # Once it has ended (however: the kernel drops the lock with the process), the resume goes on.
    assert run_in_process(tmp_path, "task.steps=6", "task.resume=auto")["steps_completed"] == 6


@pytest.mark.slow
def test_the_refusal_names_the_setting_that_chose_the_folder(tmp_path):
    """Without task.output the folder is Hydra's run directory, and the error says so."""
    with folder_lock.hold(tmp_path):
        done = subprocess.run([sys.executable, "-m", "llmarch_compose", *SMALL, *RUN, f"hydra.run.dir={tmp_path}"],
                              env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"hydra.run.dir='{tmp_path}': another run is writing into this folder (pid {os.getpid()})" in done.stderr
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("value, why", [("{missing}", "does not exist"), ("{empty}", "holds no complete checkpoint"),
                                        ("{partial}", "holds no complete checkpoint")])
def test_resume_without_a_complete_checkpoint_is_refused_before_training(tmp_path, value, why):
    (tmp_path / "empty").mkdir()
    (tmp_path / "partial/checkpoints/.step_00000002.partial").mkdir(parents=True)
    (tmp_path / "partial/checkpoints/step_00000004").mkdir(parents=True)  # no trainer.json: incomplete
    path = value.format(missing=tmp_path / "missing", empty=tmp_path / "empty", partial=tmp_path / "partial")
    with pytest.raises(ConfigError, match=f"task.resume=.*{why}"):
        run_in_process(tmp_path / "out", f"task.resume={path}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value", [("task.grad_accum_steps", 0), ("task.checkpoint_every", -1),
                                        ("task.keep_checkpoints", 0)])
def test_bad_counts_are_refused_naming_the_key(tmp_path, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_in_process(tmp_path, f"{key}={value}")
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_checkpoint_of_another_model_is_refused_and_changes_nothing(tmp_path):
    run_in_process(tmp_path, "task.steps=4", "task.checkpoint_every=2")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(resume.ResumeError, match="step_00000004: does not hold this run's model"):
        run_in_process(tmp_path, "task.resume=auto", "model.ffn_dim=96")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_metadata_that_would_run_code_is_refused(tmp_path, monkeypatch):
    run_in_process(tmp_path, "task.steps=2", "task.checkpoint_every=2")
    folder = tmp_path / "checkpoints/step_00000002"
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload()))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(resume.ResumeError, match="step_00000002"):
        run_in_process(tmp_path, "task.resume=auto")
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(pickle.UnpicklingError, match="posix.system|os.system"):
        resume.safe_reader(folder).read_metadata()


def test_grad_accumulation_trains_on_the_rows_of_the_larger_batch(tmp_path):
    accumulated = run_in_process(tmp_path / "acc", "task.grad_accum_steps=2")
    whole = run_in_process(tmp_path / "whole", "task.batch_size=4")
    a = [r["train_loss"] for r in records(tmp_path / "acc") if "train_loss" in r]
    b = [r["train_loss"] for r in records(tmp_path / "whole") if "train_loss" in r]
    assert len(a) == STEPS and a == pytest.approx(b, abs=1e-5, rel=0)
    assert accumulated["global_batch_sequences"] == whole["global_batch_sequences"] == 4
    assert accumulated["global_batch_tokens"] == 4 * 16


def test_a_diverging_run_never_checkpoints_diverged_weights(tmp_path):
    with pytest.raises(TrainingDiverged):
        run_in_process(tmp_path, "task.lr=1e6", "task.steps=20", "task.warmup_steps=0", "task.checkpoint_every=1",
                       "task.grad_clip=inf")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged"
    for folder in resume.complete_checkpoints(tmp_path):
        assert json.loads((folder / "trainer.json").read_text())["step"] < summary["diverged_at_step"]


# ---- a real kill: SIGKILL at a random step, then `task.resume=auto` ----------------------


def cli(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "llmarch_compose", *SMALL, *RUN, f"task.output={out}", *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread in every run: the same sums in the same order


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it, from /proc. torchrun starts each worker in a
    session of its own, so killing torchrun's process group leaves its ranks running."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in parents.get(pid, [])]
        tree += frontier
    return tree


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in "ZX"
    except OSError:
        return True


def kill_at_step(command: list[str], out: Path, step: int) -> None:
    """Start `command` and SIGKILL it, with every process it started, once its log has
    reached `step`; return when none of them can write any more (a preempted job)."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        log = out / "metrics.jsonl"
        lines = log.read_text().splitlines() if log.is_file() else []
        if any(json.loads(line)["step"] >= step for line in lines if line.endswith("}")):
            break
        time.sleep(0.01)
    tree = _process_tree(process.pid)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    while not all(_gone(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(_gone(pid) for pid in tree), "a killed run's process is still alive"


@pytest.mark.slow
def test_sigkill_at_a_random_step_then_resume_repeats_the_metrics(tmp_path):
    steps = ["task.steps=12", "task.checkpoint_every=3"]
    subprocess.run(cli(tmp_path / "whole", *steps), env=ENV, check=True, capture_output=True)
    kill_step = random.Random(13).randint(4, 11)
    kill_at_step(cli(tmp_path / "killed", *steps), tmp_path / "killed", kill_step)
    assert not (tmp_path / "killed/summary.json").is_file()  # killed, not finished
    assert resume.complete_checkpoints(tmp_path / "killed")
    subprocess.run(cli(tmp_path / "killed", *steps, "task.resume=auto"), env=ENV, check=True, capture_output=True)
    assert curve(tmp_path / "killed") == curve(tmp_path / "whole")


@pytest.mark.parametrize("edit", [lambda t: t.update(step="six"), lambda t: t.update(param_groups={}),
                                  lambda t: t.update(format=7), lambda t: t["param_groups"][0].pop("params")])
def test_a_trainer_state_that_does_not_fit_is_refused(tmp_path, edit):
    run_in_process(tmp_path, "task.steps=2", "task.checkpoint_every=2")
    file = tmp_path / "checkpoints/step_00000002/trainer.json"
    trainer = json.loads(file.read_text())
    edit(trainer)
    file.write_text(json.dumps(trainer))
    with pytest.raises(resume.ResumeError, match="trainer.json"):
        run_in_process(tmp_path, "task.resume=auto")
