"""The `llmarch` command end to end, in subprocesses run in a temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
LLMARCH = str(BIN / "llmarch") if (BIN / "llmarch").exists() else shutil.which("llmarch")
COMMANDS = {"llmarch": [LLMARCH], "python -m": [sys.executable, "-m", "llmarch_compose"]}

TRAIN_SMALL = ["task=train", "task.steps=5", "task.batch_size=2", "task.seq_len=32", "task.eval_every=5",
               "task.eval_batches=1", "compile=eager", "model.n_layers=1", "task.progress=false"]


def run(args, cwd: Path, command=("llmarch",), timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    env["TQDM_DISABLE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    exe = COMMANDS[command[0]]
    return subprocess.run([*exe, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def json_card(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def assert_one_paragraph(stderr: str) -> str:
    text = stderr.strip()
    assert "Traceback" not in stderr
    assert text, "no error message"
    assert "\n\n" not in text, text
    assert len(text.splitlines()) <= 3 and len(text) < 600, text
    return text


def test_console_script_exists():
    assert LLMARCH and os.access(LLMARCH, os.X_OK)


@pytest.mark.slow
def test_kv_cache_ratio_from_the_command_line(tmp_path):
    per_token = {}
    for attention in ("mha", "gqa", "mqa"):
        card = json_card(run(["model=llama2_70b", "task=summary", "task.format=json", f"attention={attention}"],
                             tmp_path))
        assert card["components"]["attention"] == attention
        per_token[attention] = card["kv_cache_bytes_per_token"]
    assert per_token["mqa"] == 2 * 80 * 128 * 2
    assert per_token["mha"] == 64 * per_token["mqa"] and per_token["gqa"] == 8 * per_token["mqa"]


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_unknown_choice_is_one_paragraph(tmp_path, command):
    proc = run(["attention=gqq"], tmp_path, command=(command,))
    assert proc.returncode != 0
    text = assert_one_paragraph(proc.stderr)
    assert "attention" in text and "'gqq'" in text and "'gqa'" in text
    assert proc.stdout.strip() == ""
    assert not (tmp_path / "outputs").exists()  # rejected before Hydra started a run


@pytest.mark.slow
def test_unknown_choice_in_a_sweep_is_rejected_before_any_job(tmp_path):
    proc = run(["-m", "attention=mha,gqq", *TRAIN_SMALL], tmp_path)
    assert proc.returncode != 0
    text = assert_one_paragraph(proc.stderr)
    assert "'gqa'" in text
    assert not (tmp_path / "multirun").exists()


@pytest.mark.parametrize("args, words", [
    (["model.n_heads=7", "task=summary"], ["model.n_heads=7", "must divide", "Valid:"]),
    (["attention.num_kv_heads=3", "task=summary"], ["attention.num_kv_heads=3", "1, 2, 4, 8"]),
    (["model.d_model=abc", "task=summary"], ["model.d_model", "abc"]),
    (["model.dmodel=64", "task=summary"], ["model.d_model"]),
])
@pytest.mark.slow
def test_validation_error_exits_without_traceback(tmp_path, args, words):
    proc = run(args, tmp_path)
    assert proc.returncode != 0
    text = assert_one_paragraph(proc.stderr)
    assert text.startswith("llmarch: error:"), text
    for word in words:
        assert word in text, (word, text)


@pytest.mark.slow
@pytest.mark.parametrize("topology", ["decoder_only", "prefix_decoder"])
def test_text_card_shows_the_choices(tmp_path, topology):
    # prefix_decoder + LayerNorm + GELU + MQA: the row the survey gives ChatGLM-3.
    proc = run(["model=mistral_7b", f"topology={topology}", "norm=layernorm", "activation=gelu",
                "attention=mqa", "task=summary"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Architecture card: mistral_7b" in out
    lines = {}
    section = None
    for line in out.splitlines():
        if line and not line.startswith(" "):
            section = line
        elif line.strip() and section in ("Components", "Dimensions"):
            lines.setdefault(line.split()[0], line.split()[1])
    assert lines["position"] == "rope"
    assert lines["norm"] == "layernorm"
    assert lines["activation"] == "gelu"
    assert lines["attention"] == "mqa"
    assert lines["ffn"] == "dense"
    assert lines["topology"] == topology
    assert lines["n_kv_heads"] == "1"
    assert "(plugin gqa)" in out  # mqa is built by the gqa plugin


@pytest.mark.slow
def test_multirun_sweep_completes_every_job(tmp_path):
    proc = run(["-m", "attention=mha,gqa", *TRAIN_SMALL], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweeps = list((tmp_path / "multirun").glob("*/*"))
    assert len(sweeps) == 1, sweeps
    jobs = sorted(p for p in sweeps[0].iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    seen = []
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        seen.append(summary["components"]["attention"])
        assert summary["steps"] == 5 and summary["compile"] == "eager"
        assert (job / "checkpoint" / "model.safetensors").is_file()
        assert (job / "checkpoint" / "config.yaml").is_file()
        lines = (job / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 6  # the initial evaluation and five steps
    assert seen == ["mha", "gqa"]


@pytest.mark.slow
def test_multirun_failed_job_does_not_stop_the_sweep(tmp_path):
    proc = run(["-m", "model.n_heads=7,8", "task=summary", "task.format=json"], tmp_path)
    assert proc.returncode != 0
    assert "model.n_heads=7" in proc.stderr
    cards = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [c["dimensions"]["n_heads"] for c in cards] == [8]


@pytest.mark.slow
def test_glob_sweep_over_a_group(tmp_path):
    proc = run(["-m", "attention=glob(m*)", "task=summary", "task.format=json"], tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.returncode == 0, proc.stderr[-2000:]
    cards = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert sorted(c["components"]["attention"] for c in cards) == ["mha", "mla", "mqa"]


@pytest.mark.slow
def test_short_default_training_run(tmp_path):
    proc = run(["task.steps=3", "task.eval_every=3", "task.eval_batches=1", "task.progress=false"], tmp_path,
               timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if (p / "summary.json").exists()]
    assert len(runs) == 1, list((tmp_path / "outputs").rglob("*"))
    out = runs[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert "val_loss" in records[0] and "val_loss" in records[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "tiny" and summary["compile"] == "default" and summary["steps"] == 3
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert (out / "checkpoint" / "config.yaml").is_file()
    assert str(out) in proc.stdout  # the closing line says where the outputs are


@pytest.mark.slow
def test_help_lists_groups_choices_tasks_and_examples(tmp_path):
    """`llmarch --help` is what a newcomer needs, taken from the registry and the config tree;
    Hydra's own dump of the whole config stays behind --hydra-help."""
    from llmarch_compose.plugin import registry

    proc = run(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    for group in (*registry.GROUPS, "model", "data", "precision", "compile", "scale"):
        line = next(line for line in text.splitlines() if line.startswith(f"  {group} "))
        assert line.split()[0] == group
    for group in registry.GROUPS:
        for name in registry.names(group):
            assert name in text, (group, name)
    for task in registry.names("task"):
        assert any(line.startswith(f"  {task} ") for line in text.splitlines()), task
    assert "mqa" in text and "llama3_8b" in text  # a YAML variant and a preset
    assert text.count("llmarch ") >= 3 and "--hydra-help" in text and "README" in text
    assert "_target_" not in text  # not Hydra's config dump
    hydra_help = run(["--hydra-help"], tmp_path)
    assert hydra_help.returncode == 0 and "Hydra" in hydra_help.stdout
