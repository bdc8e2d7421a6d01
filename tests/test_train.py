"""`task=train` in-process: the loss falls, metrics and summary are written, the
checkpoint round-trips and is saved atomically, and the learning-rate schedule."""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.artifacts import checkpoint
from llmarch_compose.artifacts.checkpoint import load_checkpoint, save_checkpoint
from llmarch_compose.tasks import train
from llmarch_compose.train import loop
from llmarch_compose.tasks.train import TrainTask, lr_at

STEPS, EVAL_EVERY = 30, 10
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.max_seq_len=64"]
TRAIN = [f"task.steps={STEPS}", "task.batch_size=8", "task.seq_len=32", "task.warmup_steps=5",
         f"task.eval_every={EVAL_EVERY}", "task.eval_batches=2", "task.progress=false"]


def train_cfg(out: Path, *extra: str):
    return lc.compose([*SMALL, *TRAIN, f"task.output={out}", *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One eager and one compiled run, each with the model it trained (captured at
    the checkpoint save)."""
    results = {}
    for mode in ("eager", "default"):
        out = tmp_path_factory.mktemp(f"train_{mode}")
        cfg = train_cfg(out, f"compile={mode}")
        captured = {}

        def capturing_save(model, cfg_, path, _orig=loop.save_checkpoint):
            captured["model"] = model
            return _orig(model, cfg_, path)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop, "save_checkpoint", capturing_save)
            summary = train.run(cfg)
        results[mode] = dict(out=out, cfg=cfg, summary=summary, model=captured["model"])
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "default"])
def test_held_out_loss_falls(runs, mode):
    s = runs[mode]["summary"]
    assert abs(s["initial_val_loss"] - math.log(256)) < 0.5  # an untrained byte model is near uniform
    assert s["final_val_loss"] < s["initial_val_loss"] - 1.0
    assert s["steps"] == STEPS and s["tokens_trained"] == STEPS * 8 * 32
    assert s["compile"] == mode
    assert s["params_total"] == sum(p.numel() for p in runs[mode]["model"].parameters())


@pytest.mark.slow
def test_compiled_run_tracks_eager(runs):
    eager, compiled = runs["eager"]["summary"], runs["default"]["summary"]
    assert compiled["initial_val_loss"] == pytest.approx(eager["initial_val_loss"], abs=1e-4)
    assert compiled["final_val_loss"] == pytest.approx(eager["final_val_loss"], abs=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "default"])
def test_metrics_and_summary_files(runs, mode):
    out, cfg = runs[mode]["out"], runs[mode]["cfg"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert "val_loss" in records[0] and "train_loss" not in records[0]
    for r in records[1:]:
        assert math.isfinite(r["train_loss"]) and r["tokens_per_s"] > 0 and math.isfinite(r["grad_norm"])
        assert r["lr"] == pytest.approx(cfg.task.lr * lr_at(r["step"], TrainTask(steps=STEPS, warmup_steps=5)))
        assert ("val_loss" in r) == (r["step"] % EVAL_EVERY == 0), r
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["initial_val_loss"] == records[0]["val_loss"]
    assert summary["components"]["attention"] == "gqa"
    assert summary["checkpoint"] == str(out / "checkpoint")
    # A corpus asks no questions: no accuracy in the records, null in the summary.
    assert not any("val_accuracy" in r for r in records) and summary["final_val_accuracy"] is None
    assert summary["data"] == "pydoc" and summary["seq_len"] == summary["task"]["seq_len"] == 32
    # 2 layers x (keys + values) x 2 KV heads x 16 dims x 4 bytes (fp32)
    assert summary["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert summary["peak_memory_bytes"] > 0
    assert summary["peak_memory_measure"] in ("process_peak_rss_since_run_start", "process_peak_rss_since_process_start")
    assert not list(out.glob(".summary.json*"))  # the temporary file was renamed into place
    # The values in effect (for the sweep report), and how loaded the machine was while timed.
    settings = summary["settings"]
    assert settings["attention"] == "gqa" and settings["attention.num_kv_heads"] == 2
    assert settings["task.seq_len"] == 32 and settings["compile"] == mode and settings["seed"] == cfg.seed
    load, measure = summary["foreign_cpu_load"], summary["foreign_cpu_load_measure"]
    assert (0.0 <= load <= 1.0 and "other processes" in measure) if load is not None else measure.startswith("unknown")


@pytest.mark.slow
def test_the_run_folder_holds_the_models_diagram(runs):
    out = runs["eager"]["out"]
    components = json.loads((out / "summary.json").read_text())["components"]
    svg = ET.fromstring((out / "diagram.svg").read_bytes())  # well-formed, with its text kept as text
    text = " ".join(svg.itertext())
    assert all(choice in text for choice in components.values()), (components, text)
    assert "decoder stack" in text and "layers 0-1" in text
    assert (out / "diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["eager", "default"])
def test_checkpoint_round_trips(runs, mode):
    out, trained = runs[mode]["out"], runs[mode]["model"]
    cfg, loaded = load_checkpoint(out / "checkpoint")
    assert cfg.model.d_model == 64 and cfg.task.steps == STEPS  # the resolved config
    assert "${" not in (out / "checkpoint" / "config.yaml").read_text()
    trained_state, loaded_state = trained.state_dict(), loaded.state_dict()
    assert trained_state.keys() == loaded_state.keys()
    for key in trained_state:
        assert torch.equal(trained_state[key], loaded_state[key]), key
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, trained(x).logits, atol=1e-5, rtol=1e-5)
    # The loaded model is not the trained one with its changes: fresh weights would differ.
    fresh = lc.build(cfg)
    assert not torch.equal(fresh.state_dict()["embed.tokens.weight"], loaded_state["embed.tokens.weight"])


def test_seq_len_defaults_to_the_context_for_a_corpus(tmp_path):
    cfg = lc.compose([*SMALL, "task.steps=1", "task.eval_batches=1", "task.batch_size=1", "task.progress=false",
                      "task.checkpoint=false", "compile=eager", f"task.output={tmp_path}"])
    assert cfg.task.seq_len is None
    assert train.run(cfg)["seq_len"] == 64  # model.max_seq_len


def test_peak_memory_on_cpu_counts_this_run():
    memory = loop.PeakMemory(torch.device("cpu"))
    before = memory.bytes()
    block = torch.ones(64 * 2**20, dtype=torch.uint8)  # 64 MiB, touched
    assert memory.bytes() >= before + block.numel() * 0.9
    if memory.measure == "process_peak_rss_since_run_start":  # Linux: a new run starts from the present
        del block
        assert loop.PeakMemory(torch.device("cpu")).bytes() < before + 32 * 2**20


def test_invalid_task_fails_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError) as info:
        train.run(train_cfg(out, "task.seq_len=128"))
    assert info.value.key == "task.seq_len" and "64" in str(info.value)
    with pytest.raises(ConfigError) as info:
        train.run(train_cfg(out, "task.steps=0"))
    assert info.value.key == "task.steps"
    with pytest.raises(ConfigError) as info:
        train.run(train_cfg(out, "model.vocab_size=100"))
    assert info.value.key == "model.vocab_size"
    assert not out.exists()


# ------------------------------------------------------------- atomic checkpoints


@pytest.fixture
def saved(tmp_path):
    """A tiny model saved as tmp_path/ckpt/checkpoint; its files' bytes."""
    cfg = lc.compose([*SMALL, "model.n_layers=1"])
    torch.manual_seed(0)
    model = lc.build(cfg)
    path = save_checkpoint(model, cfg, tmp_path / "ckpt" / "checkpoint")
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    assert set(files) == {"model.safetensors", "config.yaml", "checksums.json"}
    torch.manual_seed(1)
    other = lc.build(cfg)
    return dict(cfg=cfg, model=model, other=other, path=path, files=files)


def _assert_intact(saved):
    path = saved["path"]
    assert sorted(os.listdir(path.parent)) == ["checkpoint"], "temporary folders left behind"
    assert {p.name: p.read_bytes() for p in path.iterdir()} == saved["files"]
    _, loaded = load_checkpoint(path)
    for key, value in saved["model"].state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_overwrite_replaces_and_cleans_up(saved):
    save_checkpoint(saved["other"], saved["cfg"], saved["path"])
    assert sorted(os.listdir(saved["path"].parent)) == ["checkpoint"]
    _, loaded = load_checkpoint(saved["path"])
    assert torch.equal(loaded.state_dict()["embed.tokens.weight"], saved["other"].state_dict()["embed.tokens.weight"])


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["oserror", "interrupt"])
def test_failed_weight_write_keeps_previous_checkpoint(saved, monkeypatch, error):
    def half_write(model, filename, *args, **kwargs):
        Path(filename).write_bytes(saved["files"]["model.safetensors"][:100])  # a truncated file
        raise error

    monkeypatch.setattr(checkpoint, "save_model", half_write)
    with pytest.raises(type(error)):
        save_checkpoint(saved["other"], saved["cfg"], saved["path"])
    monkeypatch.undo()
    _assert_intact(saved)


def test_failed_config_write_keeps_previous_checkpoint(saved, monkeypatch):
    def broken_yaml(*args, **kwargs):
        raise RuntimeError("cannot serialize")

    monkeypatch.setattr(checkpoint.OmegaConf, "to_yaml", broken_yaml)
    with pytest.raises(RuntimeError, match="cannot serialize"):
        save_checkpoint(saved["other"], saved["cfg"], saved["path"])
    monkeypatch.undo()
    _assert_intact(saved)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    cfg = lc.compose([*SMALL, "model.n_layers=1"])
    model = lc.build(cfg)

    def broken(*args, **kwargs):
        raise OSError("no space")

    monkeypatch.setattr(checkpoint, "save_model", broken)
    with pytest.raises(OSError):
        save_checkpoint(model, cfg, tmp_path / "out" / "checkpoint")
    assert os.listdir(tmp_path / "out") == []


def test_failed_final_rename_keeps_previous_checkpoint(saved, monkeypatch):
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(dst) == saved["path"] and Path(src).name != ".checkpoint.old":
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(saved["other"], saved["cfg"], saved["path"])
    monkeypatch.undo()
    assert calls, "os.replace was not used"
    _assert_intact(saved)


# ------------------------------------------------------------------ lr schedule


def test_lr_schedule_warmup_then_cosine():
    task = TrainTask(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    warm = [lr_at(s, task) for s in range(10)]
    assert warm == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear up to the full rate
    assert lr_at(10, task) == pytest.approx(1.0)
    assert lr_at(55, task) == pytest.approx(0.55)  # halfway down the cosine: (1 + 0.1) / 2
    assert lr_at(100, task) == pytest.approx(0.1)
    assert lr_at(500, task) == pytest.approx(0.1)  # stays at the floor past the end
    decay = [lr_at(s, task) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # cosine shape, not linear: a quarter of the way down it has lost less than a quarter of the range
    assert lr_at(10 + 90 // 4, task) > 1 - 0.25 * 0.9


@settings(max_examples=60, deadline=None)
@given(steps=st.integers(1, 400), warmup=st.integers(0, 100), ratio=st.floats(0.0, 1.0))
def test_lr_schedule_properties(steps, warmup, ratio):
    task = TrainTask(steps=steps, warmup_steps=warmup, min_lr_ratio=ratio)
    values = [lr_at(s, task) for s in range(steps + 5)]
    assert all(min(ratio, 1.0 / max(warmup, 1)) - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    up = values[:warmup]
    assert all(a < b for a, b in zip(up, up[1:]))
    down = values[warmup:]
    assert all(a >= b - 1e-12 for a, b in zip(down, down[1:]))
    if steps > warmup:
        assert lr_at(warmup, task) == pytest.approx(1.0)
        assert lr_at(steps, task) == pytest.approx(ratio)
        assert lr_at(steps + 4, task) == pytest.approx(ratio)
