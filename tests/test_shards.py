"""Token shards: `task=tokenize` writes exactly the ids of the files (bytes, or a local
tokenizers file), `data=tokens` reads contiguous windows of them memory-mapped, a run
trains on them, and an index that does not describe its files is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.tasks import tokenize, train
from llmarch_compose.train.shards import INDEX, ShardError, TokenShards

TEXTS = [f"document {i}: " + " ".join(f"word{(i * 7 + j) % 23}" for j in range(400)) for i in range(5)]


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    for i, text in enumerate(TEXTS):
        (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
    return folder


def run_tokenize(corpus: Path, out: Path, *extra: str) -> dict:
    return tokenize.run(lc.compose(["task=tokenize", f"task.input={corpus}", f"task.output={out}",
                                    "task.progress=false", "task.workers=2", *extra]))


def split_ids(out: Path, split: str) -> np.ndarray:
    index = json.loads((out / INDEX).read_text())
    dtype = {"uint16": "<u2", "uint32": "<u4"}[index["dtype"]]
    return np.concatenate([np.fromfile(out / e["file"], dtype=dtype) for e in index["splits"][split]])


def test_byte_shards_hold_the_files_joined_and_split_per_file(corpus, tmp_path):
    out = tmp_path / "shards"
    result = run_tokenize(corpus, out, "task.shard_tokens=1000", "task.holdout_fraction=0.25")
    files = sorted(p for p in corpus.glob("**/*.txt"))
    docs = [("" if i == 0 else "\n\n").encode() + p.read_bytes() for i, p in enumerate(files)]
    cuts = [len(d) - int(len(d) * 0.25) for d in docs]
    assert bytes(split_ids(out, "train").astype(np.uint8)) == b"".join(d[:c] for d, c in zip(docs, cuts))
    assert bytes(split_ids(out, "val").astype(np.uint8)) == b"".join(d[c:] for d, c in zip(docs, cuts))
    index = json.loads((out / INDEX).read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 256 and index["tokenizer"] == "bytes"
    assert all(e["tokens"] <= 1000 for e in index["splits"]["train"]) and len(index["splits"]["train"]) > 1
    assert result["tokens"]["train"] == sum(cuts)


def test_windows_are_contiguous_runs_of_a_shard_and_targets_the_next_ids(corpus, tmp_path):
    out = tmp_path / "shards"
    run_tokenize(corpus, out, "task.shard_tokens=700")
    source = TokenShards(out)
    x, y = source.batch("train", 16, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    stream = bytes(split_ids(out, "train").astype(np.uint8))
    shards = [bytes(np.asarray(s).astype(np.uint8)) for s in source.splits["train"]]
    for row in torch.cat([x, y[:, -1:]], dim=1):
        window = bytes(row.to(torch.uint8).tolist())
        assert any(window in shard for shard in shards) and window in stream


def word_tokenizer(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_a_tokenizers_file_gives_its_ids_and_the_run_trains_on_them(corpus, tmp_path):
    from tokenizers import Tokenizer

    path = word_tokenizer(tmp_path)
    out = tmp_path / "shards"
    run_tokenize(corpus, out, f"task.tokenizer={path}")
    tok = Tokenizer.from_file(str(path))
    files = sorted(corpus.glob("**/*.txt"))
    expected = np.concatenate([tok.encode(("" if i == 0 else "\n\n") + p.read_text(),
                                          add_special_tokens=False).ids for i, p in enumerate(files)])
    got = np.concatenate([split_ids(out, "train"), split_ids(out, "val")])
    assert sorted(got.tolist()) == sorted(expected.tolist()) and len(got) == len(expected)
    vocab = tok.get_vocab_size()
    assert json.loads((out / INDEX).read_text())["vocab_size"] == vocab
    summary = train.run(lc.compose([f"data=tokens", f"data.path={out}", f"model.vocab_size={vocab}",
                                    "model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2",
                                    "compile=eager", "task.steps=30", "task.seq_len=32", "task.batch_size=8",
                                    "task.lr=1e-2", "task.eval_every=30", "task.progress=false",
                                    f"task.output={tmp_path / 'run'}"]))
    assert summary["final_val_loss"] < summary["initial_val_loss"] - 0.5  # a 26-word language is learnt fast


def test_a_vocabulary_larger_than_the_model_is_refused_before_training(corpus, tmp_path):
    out = tmp_path / "shards"
    run_tokenize(corpus, out)
    with pytest.raises(ConfigError, match=r"model\.vocab_size=100: data=tokens needs 256 token ids"):
        train.run(lc.compose(["data=tokens", f"data.path={out}", "model.vocab_size=100",
                              f"task.output={tmp_path / 'run'}", "task.progress=false"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("corrupt, message", [
    (lambda index, out: index["splits"]["train"][0].update(file="../escape.bin"), "must be a file name inside"),
    (lambda index, out: index["splits"]["train"][0].update(tokens=index["splits"]["train"][0]["tokens"] + 1),
     "lists .* tokens"),
    (lambda index, out: index.update(dtype="float32"), "dtype 'float32'"),
    (lambda index, out: index.update(max_token_id=300), "outside vocab_size"),
    (lambda index, out: index["splits"].pop("val"), "lists no 'val' shards"),
])
def test_an_index_that_does_not_describe_its_files_is_refused(corpus, tmp_path, corrupt, message):
    out = tmp_path / "shards"
    run_tokenize(corpus, out)
    index = json.loads((out / INDEX).read_text())
    corrupt(index, out)
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match=message):
        TokenShards(out)


def test_ids_above_the_stated_maximum_are_refused_when_read(corpus, tmp_path):
    out = tmp_path / "shards"
    run_tokenize(corpus, out)
    index = json.loads((out / INDEX).read_text())
    index["max_token_id"] = 10
    (out / INDEX).write_text(json.dumps(index))
    with pytest.raises(ShardError, match="above the max_token_id 10"):
        TokenShards(out).batch("train", 4, 16, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("key, value, why", [("task.output", "{corpus}", "already exists"),
                                             ("task.input", "{missing}", "no such file"),
                                             ("task.holdout_fraction", "0", "must lie in"),
                                             ("task.tokenizer", "{missing}", "no such file")])
def test_bad_tokenize_settings_are_refused_naming_the_key(corpus, tmp_path, key, value, why):
    value = value.format(corpus=corpus, missing=tmp_path / "missing")
    extra = [f"{key}={value}"]
    out = tmp_path / "out" if key != "task.output" else corpus
    with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}=.*{why}"):
        tokenize.run(lc.compose(["task=tokenize", f"task.input={corpus}", f"task.output={out}",
                                 "task.progress=false", *extra]))
    assert not (tmp_path / "out").exists()
