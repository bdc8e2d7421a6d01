"""The worked example of PLUGINS.md, examples/llmarch-extras, installed as users install
it (pip, offline, into a folder on PYTHONPATH) with no change to this project: its
plugins are selectable from the command line, listed by `task=plugins` with their
distribution, and its own test suite passes against the installed package."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmarch_compose.testing import run_llmarch, run_module

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "llmarch-extras"
DIST = "llmarch-extras"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(site folder with the installed package, a copy of the example's source tree).

    The build runs on a copy so that it leaves no build/ or egg-info in the repository."""
    root = tmp_path_factory.mktemp("example")
    source, site = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--target", str(site), str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return site, source


def test_installed_layout(installed):
    site, _ = installed
    assert (site / "llmarch_extras" / "differential.py").is_file()
    assert (site / "llmarch_extras" / "conf" / "attention" / "differential_mqa.yaml").is_file()
    assert (site / "hydra_plugins" / "llmarch_extras" / "__init__.py").is_file()
    entry_points = next(site.glob("llmarch_extras-*.dist-info")) / "entry_points.txt"
    assert "[llmarch_compose.plugins]" in entry_points.read_text()


@pytest.mark.slow
def test_selected_from_the_command_line(installed, tmp_path):
    site, _ = installed
    proc = run_llmarch(["attention=differential_mqa", "norm=dyt", "task=summary", "task.format=json"],
                       pythonpath=[site], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    card = json.loads(proc.stdout.strip().splitlines()[-1])
    assert card["components"]["attention"] == "differential_mqa"
    assert card["plugins"] == {**card["plugins"], "attention": "differential", "norm": "dyt"}
    d = card["dimensions"]
    # differential_mqa: one KV head per layer, its two key halves (head_dim each) and its
    # double-width value (2 * head_dim), in bfloat16.
    assert card["kv_cache_bytes_per_token"] == d["n_layers"] * (2 * d["head_dim"] + 2 * d["head_dim"]) * 2


@pytest.mark.slow
def test_listed_by_task_plugins_with_its_distribution(installed, tmp_path):
    site, _ = installed
    proc = run_llmarch(["task=plugins", "task.format=json"], pythonpath=[site], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    groups = json.loads(proc.stdout.strip().splitlines()[-1])["groups"]
    rows = {(g, row["name"]): row for g, listed in groups.items() for row in listed}
    diff, dyt = rows["attention", "differential"], rows["norm", "dyt"]
    assert diff["package"] == DIST and diff["version"] == "0.1.0" and dyt["package"] == DIST
    assert diff["class"] == "llmarch_extras.differential.DifferentialAttention"
    assert diff["variants"] == ["differential_mqa"]
    assert {"name": "num_kv_heads", "type": "int", "default": "${model.n_kv_heads}"} in diff["params"]
    assert dyt["doc"].startswith("Dynamic Tanh: weight * tanh(alpha * x) + bias")
    assert rows["attention", "gqa"]["package"] == "llmarch-compose"


@pytest.mark.slow
def test_the_example_test_suite_passes_against_the_installed_package(installed):
    site, source = installed
    shutil.rmtree(source / "src")  # the tests must import what pip installed
    proc = run_module("pytest", ["-q", "-x", "-p", "no:cacheprovider", "tests"], pythonpath=[site], cwd=source,
                      timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout and "failed" not in proc.stdout


@pytest.mark.slow
def test_its_task_and_data_source_run_from_the_command_line(installed, tmp_path):
    """A third-party task and data source: listed by --help, run by name, with no change here."""
    site, _ = installed
    helped = run_llmarch(["--help"], pythonpath=[site], cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert "context_budget" in helped.stdout and "parity" in helped.stdout
    proc = run_llmarch(["task=context_budget", "model=llama2_7b", "attention=mqa", "task.memory_gib=24",
                        "task.format=json"], pythonpath=[site], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["kv_cache_bytes_per_token"] == 32 * 2 * 128 * 2  # one KV head of 128 in 32 layers, bf16
    train = run_llmarch(["data=parity", "data.length=8", "model.d_model=32", "model.n_layers=1", "task.steps=3",
                         "task.batch_size=4", "task.eval_batches=1", "compile=eager", "task.progress=false",
                         f"task.output={tmp_path / 'run'}"], pythonpath=[site], cwd=tmp_path)
    assert train.returncode == 0, train.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"] == "parity" and summary["chance_accuracy"] == 0.5
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0 and summary["seq_len"] == 8
