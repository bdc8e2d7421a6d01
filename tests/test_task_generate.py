"""`task=generate`: a prompt continued by a checkpoint of ours, a Hugging Face folder or
random weights, streamed to stdout (bytes decoded incrementally, or the tokenizer saved
with the checkpoint), with its record in generation.json; and every bad setting refused
by key before any weight is read."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.artifacts.checkpoint import WEIGHTS, load_checkpoint, save_checkpoint
from llmarch_compose.inference.text import ByteCodec
from llmarch_compose.interop.hf import to_hf
from llmarch_compose.tasks import export_hf, run_task
from llmarch_compose.tasks import generate as generate_task

from conftest import TINY

BYTES = [*TINY, "model.vocab_size=256"]  # a byte-level model at test size (max_seq_len 64)
WORDS = ["[UNK]", "the", "cat", "sat", "on", "mat", "a", "dog"]


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    return lc.compose([*BYTES, "task=generate", "compile=eager", *overrides])


def compose(*overrides: str, **task):
    """The task's config (composed once per set of overrides), with `task` values set on a copy."""
    cfg = _composed(overrides).copy()
    for key, value in task.items():
        cfg.task[key] = value
    return cfg


def run(capsys, *overrides: str, **task) -> tuple[dict, str]:
    record = generate_task.run(compose(*overrides, **task))
    return record, capsys.readouterr().out


def new_tokens(model, prompt_ids: list[int], n: int, **kwargs) -> list[int]:
    out = lc.generate(model, torch.tensor([prompt_ids]), n, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def make_tokenizer(folder: Path) -> Path:
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()  # words joined by spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    (folder / "evil.py").write_text("raise SystemExit('tokenizer code ran')\n")  # never copied, never run
    return folder


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    cfg = lc.compose(BYTES)
    torch.manual_seed(3)
    model = lc.build(cfg).eval()
    folder = tmp_path_factory.mktemp("bytes") / "run" / "checkpoint"
    save_checkpoint(model, cfg, folder)
    return folder, model


@pytest.fixture
def byte_checkpoint(saved_bytes, tmp_path):
    """A byte-level checkpoint (untrained) of this test's own, in a run folder."""
    folder, model = saved_bytes
    shutil.copytree(folder, tmp_path / "run" / "checkpoint")
    return tmp_path / "run" / "checkpoint", model


@pytest.fixture(scope="module")
def saved_words(tmp_path_factory):
    root = tmp_path_factory.mktemp("words")
    tok = make_tokenizer(root / "tok")
    text = root / "words.txt"
    text.write_text("the cat sat on the mat " * 40)
    cfg = lc.compose([*TINY, "model.vocab_size=16", "data=text", f"data.path={text}", f"data.tokenizer={tok}"])
    torch.manual_seed(4)
    model = lc.build(cfg).eval()
    save_checkpoint(model, cfg, root / "checkpoint")
    return root / "checkpoint", model, cfg


@pytest.fixture
def word_checkpoint(saved_words, tmp_path):
    """An (untrained) checkpoint of a model that reads the words of a local tokenizer."""
    folder, model, cfg = saved_words
    shutil.copytree(folder, tmp_path / "words")
    return tmp_path / "words", model, cfg


# ------------------------------------------------------------------ generation


def test_random_weights_stream_the_text_that_the_record_holds(tmp_path, capsys):
    record, out = run(capsys, "seed=5", prompt="def main():", max_new_tokens=12, output=str(tmp_path))
    torch.manual_seed(5)
    model = lc.build(compose()).eval()
    prompt = list(b"def main():")
    assert record["tokens"] == new_tokens(model, prompt, 12)
    assert record["prompt_tokens"] == len(prompt) and record["new_tokens"] == 12
    assert record["output"] == ByteCodec().decode(record["tokens"])
    assert out == "def main():" + record["output"] + "\n"  # the prompt, then the stream
    assert json.loads((tmp_path / "generation.json").read_text()) == json.loads(json.dumps(record))
    assert record["source"] == "random" and record["compile"] == "eager" and record["text_codec"] == "bytes"
    assert record["time_to_first_token_s"] > 0 and record["tokens_per_s"] > 0


def test_a_checkpoint_or_its_run_folder_generates_its_own_tokens(byte_checkpoint, tmp_path, capsys):
    folder, model = byte_checkpoint
    prompt = list("naïve ".encode())
    expected = new_tokens(model, prompt, 10)
    for named in (folder, folder.parent):  # the checkpoint, or the run folder that holds it
        record, out = run(capsys, checkpoint=str(named), prompt="naïve ", max_new_tokens=10,
                          output=str(tmp_path / "out"))
        assert record["tokens"] == expected and record["checkpoint"] == str(folder)
        assert out.startswith("naïve ")


def test_sampling_follows_the_seed(byte_checkpoint, tmp_path, capsys):
    folder, model = byte_checkpoint
    settings = dict(checkpoint=str(folder), prompt="abc", max_new_tokens=16, do_sample=True, top_k=50,
                    temperature=1.5, output=str(tmp_path))
    first, _ = run(capsys, **settings, seed=1)
    again, _ = run(capsys, **settings, seed=1)
    other, _ = run(capsys, **settings, seed=2)
    assert first["tokens"] == again["tokens"] != other["tokens"]
    assert first["tokens"] == new_tokens(model, list(b"abc"), 16, do_sample=True, top_k=50, temperature=1.5, seed=1)


def test_generation_stops_at_the_models_end_token(byte_checkpoint, tmp_path, capsys):
    folder, model = byte_checkpoint
    free = new_tokens(model, list(b"abc"), 8)
    eos = free[3]  # the 4th greedy token becomes the end token
    stop = free.index(eos)
    save_checkpoint(model, lc.compose([*BYTES, f"model.eos_token_id={eos}"]), tmp_path / "eos")
    cfg = compose(checkpoint=str(tmp_path / "eos"), prompt="abc", max_new_tokens=8, output=str(tmp_path))
    record = generate_task.run(cfg)
    out = capsys.readouterr().out
    assert record["tokens"] == free[:stop + 1] and record["stopped_at_eos"]
    assert record["output"] == ByteCodec().decode(free[:stop])  # the end token is not text
    assert out == "abc" + record["output"] + "\n"
    cfg.task.stop_at_eos = False
    assert generate_task.run(cfg)["tokens"] == free


def test_bytes_stream_whole_characters():
    text = "héllo → 世界 🙂!"
    streamer = ByteCodec().streamer([])
    pieces = [streamer.push([b]) for b in text.encode()] + [streamer.finish()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # a split character waits for its last byte
    assert [p for p in pieces if p][:2] == ["h", "é"]
    bad = ByteCodec().streamer([])
    assert bad.push([0xE4, 0xB8]) == "" and bad.push([ord("x")]) == "\ufffdx"  # a cut-off character
    assert bad.push([300, ord("y")]) == "\ufffdy" and bad.finish() == ""  # an id that is no byte


# ------------------------------------------------------------------ tokenizers


def test_the_checkpoint_keeps_its_tokenizer_and_generates_words(word_checkpoint, tmp_path, capsys):
    folder, model, _ = word_checkpoint
    names = sorted(p.name for p in folder.iterdir())
    assert "tokenizer.json" in names and "tokenizer_config.json" in names and "evil.py" not in names
    record, out = run(capsys, checkpoint=str(folder), prompt="the cat", max_new_tokens=6, output=str(tmp_path))
    assert record["prompt_tokens"] == 2 and record["text_codec"] == f"tokenizer {folder}"
    expected = new_tokens(model, [1, 2], 6)
    assert record["tokens"] == expected
    words = [WORDS[i] for i in expected if i < len(WORDS)]  # ids past the tokenizer's vocabulary: no text
    assert record["output"].split() == words
    assert out.startswith("the cat") and out.split() == ["the", "cat", *words]


def test_a_missing_tokenizer_is_refused_before_the_weights_are_read(word_checkpoint, capsys):
    folder, _, _ = word_checkpoint
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    (folder / WEIGHTS).write_bytes(b"not weights")
    with pytest.raises(ConfigError) as info:
        run(capsys, checkpoint=str(folder), prompt="the")
    assert info.value.key == "task.checkpoint" and "data.tokenizer=" in str(info.value)
    assert "copied into" in str(info.value)


def test_export_writes_the_tokenizer_and_the_folder_generates_alike(word_checkpoint, tmp_path, capsys):
    folder, model, cfg = word_checkpoint
    export = lc.compose(["task=export_hf", f"task.checkpoint={folder}", f"task.output={tmp_path / 'hf'}"])
    assert export_hf.run(export)["tokenizer"]
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "hf").iterdir()}
    assert not (tmp_path / "hf" / "evil.py").exists()
    overrides = ["task=generate", "compile=eager", "model=hf", f"model.path={tmp_path / 'hf'}",
                 'task.prompt="the cat"', "task.max_new_tokens=6", f"task.output={tmp_path}"]
    record = run_task(lc.compose(overrides), overrides)
    assert record["source"] == "hf" and record["tokens"] == new_tokens(model, [1, 2], 6)
    # to_hf itself takes the tokenizer the config's data was read with
    to_hf(model, cfg, tmp_path / "direct")
    assert (tmp_path / "direct" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()


# ------------------------------------------------------------------ refused before any work


@pytest.mark.parametrize("task, key, words", [
    ({}, "task.prompt", "name the text"),
    ({"prompt": ""}, "task.prompt", "name the text"),
    ({"prompt": "x" * 65}, "task.prompt", "longer than model.max_seq_len=64"),
    ({"prompt": "x" * 60, "max_new_tokens": 5}, "task.max_new_tokens", "1..4"),
    ({"prompt": "abc", "max_new_tokens": 0}, "task.max_new_tokens", ">= 1"),
    ({"prompt": "abc", "top_p": 1.5}, "task.top_p", "(0, 1]"),
    ({"prompt": "abc", "temperature": 0.0}, "task.temperature", "> 0"),
    ({"prompt": "abc", "top_k": 0}, "task.top_k", ">= 1"),
])
def test_bad_settings_name_their_key_before_the_weights_are_read(byte_checkpoint, capsys, task, key, words):
    folder, _ = byte_checkpoint
    (folder / WEIGHTS).write_bytes(b"not weights")  # reading them would fail otherwise
    with pytest.raises(ConfigError) as info:
        run(capsys, checkpoint=str(folder), **task)
    assert info.value.key == key and words in str(info.value), info.value


def test_a_prompt_outside_the_vocabulary_and_models_that_do_not_write_left_to_right(tmp_path, capsys):
    small = lc.compose([*TINY, "model.vocab_size=128"])
    save_checkpoint(lc.build(small), small, tmp_path / "small")
    (tmp_path / "small" / WEIGHTS).write_bytes(b"not weights")
    with pytest.raises(ConfigError) as info:  # UTF-8 of é is two bytes past 127
        run(capsys, checkpoint=str(tmp_path / "small"), prompt="é", max_new_tokens=4)
    assert info.value.key == "task.prompt" and "past model.vocab_size=128" in str(info.value)
    with pytest.raises(ConfigError) as info:
        run(capsys, "topology=encoder_only", prompt="abc")
    assert info.value.key == "topology" and "fill_mask" in str(info.value)


def test_missing_folders_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError) as info:
        run(capsys, checkpoint=str(tmp_path / "none"), prompt="abc")
    assert info.value.key == "task.checkpoint" and "no such folder" in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as info:
        run(capsys, checkpoint=str(tmp_path / "empty"), prompt="abc")
    assert info.value.key == "task.checkpoint" and "not a checkpoint folder" in str(info.value)


def test_an_encoder_decoder_decodes_from_its_start_token(tmp_path, capsys):
    record, out = run(capsys, "topology=encoder_decoder", "model.decoder_start_token_id=0", prompt="abc",
                      max_new_tokens=5, output=str(tmp_path))
    assert record["new_tokens"] == 5 and out == record["output"] + "\n"


# ------------------------------------------------------------------ slow: training, compiling, the command line


def llmarch(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llmarch_compose", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_trained_checkpoint_generates_with_the_tokenizer_it_was_trained_with(tmp_path, capsys):
    from llmarch_compose.tasks import train

    tok = make_tokenizer(tmp_path / "tok")
    text = tmp_path / "words.txt"
    text.write_text("the cat sat on the mat " * 200)
    train.run(lc.compose([*TINY, "model.vocab_size=16", "data=text", f"data.path={text}", f"data.tokenizer={tok}",
                          "compile=eager", "task.steps=30", "task.lr=1e-2", "task.batch_size=8", "task.seq_len=32",
                          "task.eval_every=30", "task.progress=false", f"task.output={tmp_path / 'run'}"]))
    checkpoint = tmp_path / "run" / "checkpoint"
    assert (checkpoint / "tokenizer.json").read_bytes() == (tok / "tokenizer.json").read_bytes()
    capsys.readouterr()
    record, out = run(capsys, checkpoint=str(checkpoint), prompt="the cat sat", max_new_tokens=6,
                      output=str(tmp_path))
    _, model = load_checkpoint(checkpoint)
    assert record["tokens"] == new_tokens(model.eval(), [1, 2, 3], 6)
    assert record["output"].split() == ["on", "the", "mat", "the", "cat", "sat"]  # 30 steps learn the cycle
    assert out.split()[:9] == ["the", "cat", "sat", "on", "the", "mat", "the", "cat", "sat"]


@pytest.mark.slow
def test_compiled_decoding_writes_what_eager_does(byte_checkpoint, tmp_path, capsys):
    folder, _ = byte_checkpoint
    settings = dict(checkpoint=str(folder), prompt="def main():", max_new_tokens=20, output=str(tmp_path))
    eager, _ = run(capsys, **settings)
    compiled = generate_task.run(compose("compile=default", **settings))
    assert compiled["compile"] == "default" and compiled["tokens"] == eager["tokens"]


@pytest.mark.slow
def test_the_command_line_streams_and_refuses_with_exit_2(byte_checkpoint, tmp_path):
    folder, _ = byte_checkpoint
    proc = llmarch(["task=generate", f"task.checkpoint={folder}", 'task.prompt="def main():"',
                    "task.max_new_tokens=8", "compile=eager", f"task.output={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "out" / "generation.json").read_text())
    assert proc.stdout == "def main():" + record["output"] + "\n"
    assert "8 tokens" in proc.stderr and "generation.json" in proc.stderr
    proc = llmarch(["task=generate", f"task.checkpoint={folder}", "task.prompt=" + "x" * 100], tmp_path)
    assert proc.returncode == 2 and "task.prompt=" in proc.stderr and "Traceback" not in proc.stderr
