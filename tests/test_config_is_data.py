"""A config is data: it names no import path that runs, loads no code, and every key it
sets is used or the run refuses. Hostile files are built here, in temporary folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError

B = ["model.d_model=32", "model.n_layers=1", "task.steps=2", "task.batch_size=2", "task.seq_len=16",
     "compile=eager", "task.progress=false"]


def llmarch(args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llmarch_compose", *args, f"hydra.run.dir={cwd / 'out'}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("precious")
    return path


def assert_refused(proc, key, victim):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"llmarch: error: {key}="), proc.stderr
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ 1. no import path runs

def test_callback_target_from_the_command_line_is_refused(tmp_path, victim):
    proc = llmarch([*B, "+hydra.callbacks.x={_target_:builtins.open,_args_:[victim,w]}"], tmp_path)
    assert_refused(proc, "hydra.callbacks.x._target_", victim)
    assert "builtins.open" in proc.stderr


def test_torch_load_callback_from_a_config_dir_file_is_refused(tmp_path, victim):
    folder = tmp_path / "confs"
    folder.mkdir()
    (folder / "evil.yaml").write_text("defaults:\n  - config\n  - _self_\nhydra:\n  callbacks:\n    x:\n"
                                      "      _target_: torch.load\n      f: victim\n      weights_only: false\n")
    proc = llmarch(["--config-dir", str(folder), "--config-name", "evil", *B], tmp_path)
    assert_refused(proc, "hydra.callbacks.x._target_", victim)


def test_launcher_and_sweeper_targets_must_be_hydra_plugins(tmp_path, victim):
    proc = llmarch([*B, "hydra.launcher._target_=builtins.open"], tmp_path)
    assert_refused(proc, "hydra.launcher._target_", victim)
    proc = llmarch([*B, "hydra/sweeper=optuna", "hydra.sweeper.sampler._target_=builtins.exec"], tmp_path)
    assert_refused(proc, "hydra.sweeper.sampler._target_", victim)


def test_a_target_outside_the_hydra_node_is_refused():
    with pytest.raises(ConfigError, match=r"task\.x\._target_='os\.system'"):
        lc.compose(["+task.x={_target_:os.system}"])


def test_registered_and_hydra_callbacks_are_accepted(tmp_path):
    proc = llmarch([*B, "+hydra.callbacks.log={_target_:hydra.experimental.callbacks.LogJobReturnCallback}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout
