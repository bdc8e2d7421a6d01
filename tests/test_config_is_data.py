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


# ------------------------------------------------------------------ 2. tokenizers and checkpoint folders run no code

def test_tokenizer_folder_with_auto_map_is_refused_without_a_prompt(tmp_path, victim):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", null]}}')
    (tok / "evil.py").write_text(f"open({str(victim)!r}, 'w')\n")
    (tmp_path / "notes.txt").write_text("some text to train on " * 200)
    proc = llmarch([*B, "data=text", f"data.path={tmp_path / 'notes.txt'}", f"data.tokenizer={tok}"], tmp_path)
    assert_refused(proc, "data.tokenizer", victim)
    assert "tokenizer_config.json has auto_map" in proc.stderr


def test_auto_map_in_config_json_is_refused(tmp_path):
    from llmarch_compose.train.data import load_tokenizer

    (tmp_path / "config.json").write_text('{"auto_map": {"AutoConfig": "x.Y"}}')
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*config\.json has auto_map"):
        load_tokenizer(str(tmp_path))


def test_billion_laughs_checkpoint_config_fails_fast(tmp_path):
    import time

    from llmarch_compose.artifacts.checkpoint import load_checkpoint

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\nmodel: {name: x}\n")
    start = time.perf_counter()
    with pytest.raises(lc.LlmarchError, match="config.yaml: YAML anchors and aliases"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - start < 0.5


def test_oversized_checkpoint_config_is_refused(tmp_path):
    from llmarch_compose.artifacts.checkpoint import load_checkpoint

    (tmp_path / "config.yaml").write_text("model: {name: x}\n" + "# pad\n" * (1 << 20))
    with pytest.raises(lc.LlmarchError, match="config.yaml: larger than 4 MiB"):
        load_checkpoint(tmp_path)


def test_non_json_hf_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("model_type: llama\n")
    with pytest.raises(lc.LlmarchError, match=r"config\.json: not valid JSON"):
        lc.compose(["model=hf", f"model.path={tmp_path}"])


def test_oversized_hf_config_is_refused(tmp_path):
    from llmarch_compose.interop.hf import read_config

    (tmp_path / "config.json").write_text('{"model_type": "llama", "pad": "' + "x" * (17 << 20) + '"}')
    with pytest.raises(lc.LlmarchError, match=r"config\.json: larger than 16 MiB"):
        read_config(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "pickle"])
def test_bad_safetensors_names_the_file(tmp_path, kind, victim):
    import torch
    from safetensors.torch import save_file

    from llmarch_compose.interop.hf import read_tensors

    file = tmp_path / "model.safetensors"
    if kind == "truncated":
        save_file({"w": torch.zeros(64, 64)}, str(file))
        file.write_bytes(file.read_bytes()[:-100])
    else:  # a pickle that would write to the victim when unpickled
        class Evil:
            def __reduce__(self):
                return (open, (str(victim), "w"))

        import pickle

        file.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(lc.LlmarchError, match=r"model\.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path)
    assert victim.read_text() == "precious"
