"""No failure destroys a good result: hyper-parameters are checked before training, a
diverging run stops and writes no weights, summary.json is valid JSON whatever
happened, checkpoints survive a kill at any point of a save, and a folder that holds
a run is not reused by accident."""

from __future__ import annotations

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
