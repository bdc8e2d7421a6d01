"""`task=eval`: perplexity over non-overlapping windows, checked against a naive loop over
the same windows; bits per byte for byte-level models; one row per context length,
lengths past the training length evaluated where the positions reach and refused, as a
row, past a learned position table; the held-out split by default, a tokenizer saved
with the checkpoint, the files written, and bad settings refused by key."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.artifacts.checkpoint import WEIGHTS, save_checkpoint
from llmarch_compose.tasks import eval as eval_task
from llmarch_compose.train.data import data_config, make_source
from llmarch_compose import CAUSAL_LM

from conftest import TINY

BYTES = [*TINY, "model.vocab_size=256"]  # byte-level, max_seq_len 64
TEXT = ("The quick brown fox jumps over the lazy dog. Ünïcödé bytes too: → 世界.\n" * 12).encode()


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    return lc.compose([*BYTES, "task=eval", "compile=eager", "task.progress=false", *overrides])


def compose(*overrides: str, **task):
    cfg = _composed(overrides).copy()
    for key, value in task.items():
        cfg.task[key] = value
    return cfg


def run(*overrides: str, **task) -> dict:
    return eval_task.run(compose(*overrides, **task))


@functools.lru_cache(maxsize=None)
def _model(position: str):
    torch.manual_seed(7)
    cfg = lc.compose([*BYTES, f"position={position}"])
    return cfg, lc.build(cfg).eval()


@pytest.fixture
def checkpoint(tmp_path):
    """A byte-level RoPE model (untrained) as a checkpoint, and a text file."""
    cfg, model = _model("rope")
    save_checkpoint(model, cfg, tmp_path / "checkpoint")
    (tmp_path / "text.txt").write_bytes(TEXT)
    return tmp_path / "checkpoint", model, tmp_path / "text.txt"


@torch.no_grad()
def reference(model, stream: list[int], length: int, max_windows: int) -> float:
    """Mean NLL per predicted token, one window at a time, from log-softmax by hand."""
    total, count = 0.0, 0
    for i in range(min(max_windows, (len(stream) - 1) // length)):
        window = stream[i * length: i * length + length + 1]
        logits = model(torch.tensor([window[:-1]])).logits[0].double()
        logp = logits - logits.exp().sum(-1, keepdim=True).log()
        for position, target in enumerate(window[1:]):
            total -= float(logp[position, target])
            count += 1
    return total / count


def test_perplexity_is_the_exponential_of_a_naive_mean_over_the_same_windows(checkpoint, tmp_path):
    folder, model, text = checkpoint
    report = run(checkpoint=str(folder), path=str(text), context_lengths=[32, 8, 16, 100], max_windows=5,
                 batch_size=2, output=str(tmp_path / "out"))
    rows = report["rows"]
    assert [r["context_length"] for r in rows] == [8, 16, 32, 100]  # one row per length, in order
    stream = list(TEXT)
    assert report["stream_tokens"] == len(stream) and report["byte_level"]
    for row in rows:
        length = row["context_length"]
        assert row["status"] == "ok" and row["windows"] == min(5, (len(stream) - 1) // length)
        assert row["tokens"] == row["windows"] * length
        nats = reference(model, stream, length, 5)
        assert row["nats_per_token"] == pytest.approx(nats, rel=1e-6)
        assert row["perplexity"] == pytest.approx(math.exp(nats), rel=1e-6)
        assert row["bits_per_byte"] == pytest.approx(row["nats_per_token"] / math.log(2), rel=1e-12)
    assert rows[-1]["context_length"] > report["trained_seq_len"] == 64  # RoPE: evaluated past its length


def test_the_report_files(checkpoint, tmp_path):
    folder, _, text = checkpoint
    out = tmp_path / "out"
    report = run(checkpoint=str(folder), path=str(text), context_lengths=[8, 16], max_windows=2, output=str(out))
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "eval.md", "eval.png"]  # nothing half-written
    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(report))
    markdown = (out / "eval.md").read_text()
    assert markdown.startswith(f"# Perplexity of tiny from {folder}")
    assert f"| 8 | 2 | 16 | {report['rows'][0]['nats_per_token']:.4f} |" in markdown
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_learned_positions_refuse_a_length_past_their_table_in_the_report(tmp_path):
    cfg, model = _model("learned")
    save_checkpoint(model, cfg, tmp_path / "learned")
    (tmp_path / "text.txt").write_bytes(TEXT)
    report = run(checkpoint=str(tmp_path / "learned"), path=str(tmp_path / "text.txt"), context_lengths=[32, 64, 128],
                 max_windows=2, output=str(tmp_path / "out"))
    assert report["max_positions"] == 64
    assert [r["status"] for r in report["rows"]] == ["ok", "ok", "refused"]
    assert "learned position table holds 64 positions" in report["rows"][2]["reason"]
    assert "refused: the model's learned position table" in (tmp_path / "out" / "eval.md").read_text()
    with pytest.raises(ConfigError) as info:  # nothing left to evaluate: refused up front
        run(checkpoint=str(tmp_path / "learned"), path=str(tmp_path / "text.txt"), context_lengths=[128, 256])
    assert info.value.key == "task.context_lengths" and "at most 64" in str(info.value)


def test_a_length_longer_than_the_text_is_a_refused_row(checkpoint, tmp_path):
    folder, _, text = checkpoint
    (tmp_path / "short.txt").write_bytes(b"x" * 40)
    report = run(checkpoint=str(folder), path=str(tmp_path / "short.txt"), context_lengths=[16, 64],
                 output=str(tmp_path / "out"))
    assert [r["status"] for r in report["rows"]] == ["ok", "refused"]
    assert report["rows"][0]["windows"] == 2 and "holds 40 tokens" in report["rows"][1]["reason"]


def test_the_default_text_is_the_held_out_split_and_the_default_length_the_trained_one(tmp_path):
    report = run(output=str(tmp_path), max_windows=2)  # random weights, data=pydoc
    held_out = make_source(data_config(lc.compose(BYTES).data), CAUSAL_LM, "decoder_only").splits["val"]
    assert report["stream_tokens"] == len(held_out) and report["text"] == "the held-out split of data=pydoc"
    assert [r["context_length"] for r in report["rows"]] == [64] and report["source"] == "random"


def test_a_checkpoint_trained_with_a_tokenizer_reads_its_text_through_it(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "the", "cat", "sat", "on", "mat"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path / "tok")
    text = tmp_path / "words.txt"
    text.write_text("the cat sat on the mat " * 30)  # 180 words
    cfg = lc.compose([*TINY, "model.vocab_size=8", "data=text", f"data.path={text}",
                      f"data.tokenizer={tmp_path / 'tok'}", "data.holdout_fraction=0.5"])
    torch.manual_seed(2)
    model = lc.build(cfg).eval()
    save_checkpoint(model, cfg, tmp_path / "checkpoint")
    (tmp_path / "tok" / "tokenizer.json").unlink()  # the checkpoint's own copy is what is read
    report = run(checkpoint=str(tmp_path / "checkpoint"), context_lengths=[10], max_windows=3,
                 output=str(tmp_path / "out"))
    assert report["stream_tokens"] == 90 and not report["byte_level"]
    stream = [1, 2, 3, 4, 1, 5] * 15
    (row,) = report["rows"]
    assert row["bits_per_byte"] is None and row["nats_per_token"] == pytest.approx(reference(model, stream, 10, 3),
                                                                                   rel=1e-6)


@pytest.mark.parametrize("task, key", [
    ({"context_lengths": []}, "task.context_lengths"),
    ({"context_lengths": [8, 0]}, "task.context_lengths"),
    ({"context_lengths": [8, 8]}, "task.context_lengths"),
    ({"max_windows": 0}, "task.max_windows"),
    ({"batch_size": 0}, "task.batch_size"),
    ({"path": "/no/such/text"}, "task.path"),
    ({"glob": "*.none"}, "task.glob"),
])
def test_bad_settings_name_their_key_before_the_weights_are_read(checkpoint, task, key):
    folder, _, text = checkpoint
    (folder / WEIGHTS).write_bytes(b"not weights")
    with pytest.raises(ConfigError) as info:
        run(checkpoint=str(folder), **{"path": str(text.parent), **task})
    assert info.value.key == key, info.value


def test_models_and_data_without_left_to_right_text_are_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        run("topology=encoder_only")
    assert info.value.key == "topology" and "decoder_only" in str(info.value)
    with pytest.raises(ConfigError) as info:
        run("data=recall")
    assert info.value.key == "data" and "task.path" in str(info.value)
    (tmp_path / "t.txt").write_text("é" * 50)
    with pytest.raises(ConfigError) as info:
        run("model.vocab_size=128", path=str(tmp_path / "t.txt"))
    assert info.value.key == "task.path" and "past model.vocab_size=128" in str(info.value)


# ------------------------------------------------------------------ slow: training, compiling, the command line


@pytest.mark.slow
def test_a_trained_model_beats_chance_and_compiled_evaluation_agrees(tmp_path):
    from llmarch_compose.tasks import train

    summary = train.run(lc.compose([*BYTES, "compile=eager", "task.steps=40", "task.batch_size=8",
                                    "task.eval_every=40", "task.progress=false", f"task.output={tmp_path / 'run'}"]))
    settings = dict(checkpoint=str(tmp_path / "run"), context_lengths=[32, 64, 128], max_windows=6, batch_size=4)
    eager = run(**settings, output=str(tmp_path / "eager"))
    compiled = run("compile=default", **settings, output=str(tmp_path / "compiled"))
    assert compiled["compile"] == "default"
    for a, b in zip(eager["rows"], compiled["rows"]):
        assert a["status"] == b["status"] == "ok"
        assert b["nats_per_token"] == pytest.approx(a["nats_per_token"], rel=1e-4)
        assert a["perplexity"] < 256 / 4  # far better than a uniform guess over bytes after 40 steps
    # at the trained length, on the same held-out split: about the loss the training run measured
    assert eager["rows"][1]["nats_per_token"] == pytest.approx(summary["final_val_loss"], abs=0.3)


@pytest.mark.slow
def test_the_command_line_writes_the_report_and_refuses_with_exit_2(checkpoint, tmp_path):
    folder, _, text = checkpoint
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    args = [sys.executable, "-m", "llmarch_compose", "task=eval", f"task.checkpoint={folder}", f"task.path={text}",
            "compile=eager", f"task.output={tmp_path / 'out'}"]
    proc = subprocess.run([*args, "task.context_lengths=[16,32]"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 16 |" in proc.stdout and "| 32 |" in proc.stdout and (tmp_path / "out" / "eval.png").is_file()
    assert "eval" in proc.stderr  # the progress bar
    proc = subprocess.run([*args, "task.context_lengths=[0]"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 2 and "task.context_lengths=" in proc.stderr and "Traceback" not in proc.stderr
