"""The data group: corpora (pydoc, a user's text) and synthetic tasks (recall, copy,
sort): determinism, what each task asks and answers, exact-match accuracy, errors
that name the key, and a short training run on recall."""

from __future__ import annotations

import json

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError, UnknownChoiceError
from llmarch_compose.train.data import BYTE_VOCAB, data_config, make_source
from llmarch_compose.plugin.objectives import CAUSAL_LM, IGNORE, MASKED_LM, SEQ2SEQ
from llmarch_compose.train.metrics import exact_match
from llmarch_compose.train.synthetic import FILLER, FIRST_SYMBOL, SEPARATOR
from llmarch_compose.tasks import train

from conftest import TINY


def source(*overrides: str, objective=CAUSAL_LM, topology: str = "decoder_only"):
    cfg = lc.compose(list(overrides))
    return make_source(data_config(cfg.data), objective, topology)


def draw(src, seed=0, split="train", batch_size=64, seq_len=None):
    return src.batch(split, batch_size, seq_len or src.natural_seq_len, torch.Generator().manual_seed(seed))


SYNTHETIC = ["recall", "copy", "sort"]


# ------------------------------------------------------------------ synthetic tasks


@pytest.mark.parametrize("name", SYNTHETIC)
def test_synthetic_batches_follow_the_seed(name):
    src = source(f"data={name}")
    x, y = draw(src, seed=3)
    again_x, again_y = draw(src, seed=3)
    other_x, _ = draw(src, seed=4)
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert not torch.equal(x, other_x)
    # The held-out split is another stream, even from the same generator state.
    val_x, _ = draw(src, seed=3, split="val")
    assert not torch.equal(x, val_x)
    assert x.shape == y.shape == (64, src.natural_seq_len) and x.dtype == y.dtype == torch.long
    assert int(x.max()) < src.vocab_size and int(y[y != IGNORE].max()) < src.vocab_size
    assert src.vocab_size <= BYTE_VOCAB and src.has_accuracy


@pytest.mark.parametrize("name", SYNTHETIC)
def test_targets_are_the_next_tokens_at_answers_only(name):
    src = source(f"data={name}")
    x, y = draw(src)
    asked = y != IGNORE
    # Every target that is asked is the next input token (where that input exists).
    assert torch.equal(y[:, :-1][asked[:, :-1]], x[:, 1:][asked[:, :-1]])
    assert asked.any(dim=1).all()


def test_recall_answers_are_the_paired_values_at_the_distance():
    pairs, queries, distance = 6, 4, 20
    src = source("data=recall", f"data.num_pairs={pairs}", f"data.num_queries={queries}",
                 f"data.min_distance={distance}", "data.num_keys=10", "data.num_values=7")
    assert src.vocab_size == FIRST_SYMBOL + 10 + 7 and src.chance_accuracy == pytest.approx(1 / 7)
    x, y = draw(src, batch_size=200)
    seen_distances, repeats = [], 0
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        keys, values = row_x[0:2 * pairs:2], row_x[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(FIRST_SYMBOL <= k < FIRST_SYMBOL + 10 for k in keys)
        assert all(FIRST_SYMBOL + 10 <= v < src.vocab_size for v in values)
        asked = [i for i, t in enumerate(row_y) if t != IGNORE]
        query_keys = row_x[len(row_x) - 2 * queries + 1::2]  # the last query's value is only a target
        # Only a key's first query is scored: a repeat's value could be copied from nearby.
        assert [row_x[i] for i in asked] == list(dict.fromkeys(query_keys))
        repeats += len(asked) < queries
        for i in asked:
            key = row_x[i]
            where = keys.index(key)
            assert row_y[i] == values[where]  # the answer is the value paired with the key
            seen_distances.append(i - 2 * where)
        # Between the pairs and the queries only filler.
        assert set(row_x[2 * pairs: asked[0]]) == {FILLER}
    assert min(seen_distances) == distance  # respected, and the bound is tight
    # Keys are asked with replacement: 4 draws of 6 keys repeat one with probability
    # 1 - 6*5*4*3 / 6^4 = 13/18.
    assert abs(repeats / len(x) - 13 / 18) < 0.1


def test_recall_pads_on_the_left_for_a_longer_sequence():
    src = source("data=recall")
    x, y = draw(src, seq_len=src.natural_seq_len + 5)
    short_x, short_y = draw(src)
    assert torch.equal(x[:, 5:], short_x) and torch.equal(y[:, 5:], short_y)
    assert (x[:, :5] == FILLER).all() and (y[:, :5] == IGNORE).all()


@pytest.mark.parametrize("name", ["copy", "sort"])
def test_copy_and_sort_answers(name):
    length = 9
    src = source(f"data={name}", f"data.length={length}", "data.num_symbols=5")
    assert src.natural_seq_len == 2 * length and src.vocab_size == FIRST_SYMBOL + 5
    x, y = draw(src)
    segment = x[:, :length]
    assert (x[:, length] == SEPARATOR).all()
    assert ((segment >= FIRST_SYMBOL) & (segment < FIRST_SYMBOL + 5)).all()
    answers = y[:, length:]
    assert (y[:, :length] == IGNORE).all() and (answers != IGNORE).all()
    want = segment if name == "copy" else segment.sort(dim=1).values
    assert torch.equal(answers, want)
    if name == "sort":
        assert (answers[:, 1:] >= answers[:, :-1]).all()


def test_exact_match_against_a_hand_made_case():
    # Two rows, vocabulary of 4; the predictions are the argmax of one-hot logits.
    predicted = torch.tensor([[1, 2, 3, 0], [2, 2, 1, 1]])
    logits = torch.nn.functional.one_hot(predicted, 4).float()
    targets = torch.tensor([[IGNORE, 2, 3, IGNORE],   # both answers right
                            [IGNORE, 0, 1, IGNORE]])  # one right, one wrong
    assert exact_match(logits, targets) == (3, 4, 1, 2)
    # A row with nothing asked counts for neither tokens nor sequences.
    none_asked = torch.full((1, 4), IGNORE)
    assert exact_match(logits[:1], none_asked) == (0, 0, 0, 0)


# ---------------------------------------------------------------------- corpora


def test_pydoc_is_the_default_byte_corpus():
    src = source()
    assert src.vocab_size == BYTE_VOCAB and not src.has_accuracy and src.natural_seq_len is None
    x, y = draw(src, batch_size=4, seq_len=32)
    assert torch.equal(x[:, 1:], y[:, :-1])


def test_text_file_and_folder_as_bytes(tmp_path):
    file = tmp_path / "one.txt"
    file.write_text("abcdefghij" * 50)
    src = source("data=text", f"data.path={file}", "data.holdout_fraction=0.2")
    assert src.vocab_size == BYTE_VOCAB
    assert bytes(src.splits["train"].tolist()) == file.read_bytes()[:400]
    assert bytes(src.splits["val"].tolist()) == file.read_bytes()[400:]
    x, y = draw(src, batch_size=3, seq_len=16)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (3, 16)

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_bytes(b"second " * 20)
    (folder / "sub" / "a.txt").write_bytes(b"first " * 20)
    (folder / "skip.bin").write_bytes(b"\xff" * 100)
    src = source("data=text", f"data.path={folder}", "data.holdout_fraction=0.5")
    text = b"\n\n".join([b"second " * 20, b"first " * 20])  # sorted paths: b.txt, sub/a.txt
    assert bytes(torch.cat(list(src.splits.values())).tolist()) == text


def test_text_with_a_local_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "mat", "[UNK]"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "tok"
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(folder)
    file = tmp_path / "t.txt"
    file.write_text("the cat sat on the mat " * 30)
    src = source("data=text", f"data.path={file}", f"data.tokenizer={folder}")
    assert src.vocab_size == len(words)
    assert src.splits["train"][:6].tolist() == [0, 1, 2, 3, 0, 4]


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("overrides, key", [
    (["data=text"], "data.path"),
    (["data=text", "data.path=/no/such/file"], "data.path"),
    (["data=pydoc", "data.holdout_fraction=1.5"], "data.holdout_fraction"),
    (["data=recall", "data.num_queries=0"], "data.num_queries"),
    (["data=recall", "data.num_pairs=40"], "data.num_pairs"),
    (["data=recall", "data.min_distance=1"], "data.min_distance"),
    (["data=recall", "data.num_values=0"], "data.num_values"),
    (["data=copy", "data.length=0"], "data.length"),
    (["data=sort", "data.num_symbols=1"], "data.num_symbols"),
    (["data=recall", "data.num_pairs=many"], "data.num_pairs"),
])
def test_bad_values_name_their_key(overrides, key):
    with pytest.raises(ConfigError) as info:
        source(*overrides)
    assert info.value.key == key, info.value


def test_empty_folder_and_missing_tokenizer(tmp_path):
    with pytest.raises(ConfigError) as info:
        source("data=text", f"data.path={tmp_path}")
    assert info.value.key == "data.glob"
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ConfigError) as info:
        source("data=text", f"data.path={tmp_path}", f"data.tokenizer={tmp_path / 'none'}")
    assert info.value.key == "data.tokenizer" and "never downloaded" in str(info.value)


def test_unknown_choice_and_unknown_key():
    with pytest.raises(UnknownChoiceError, match="recall"):
        lc.compose(["data=recal"])
    with pytest.raises(ConfigError) as info:
        lc.compose(["data=pydoc", "data.num_pairs=3"])
    assert "num_pairs" in str(info.value)


@pytest.mark.parametrize("topology, objective", [("encoder_only", MASKED_LM), ("t5", SEQ2SEQ)])
def test_synthetic_tasks_need_a_causal_objective(topology, objective):
    with pytest.raises(ConfigError) as info:
        source("data=copy", objective=objective, topology=topology)
    assert info.value.key == "data" and topology in str(info.value) and objective.name in str(info.value)


def test_train_refuses_what_the_data_cannot_use(tmp_path):
    out = tmp_path / "never"
    common = [*TINY, "task.steps=1", f"task.output={out}"]
    with pytest.raises(ConfigError) as info:  # recall's 34 ids do not fit 30
        train.run(lc.compose([*common, "data=recall", "model.vocab_size=30"]))
    assert info.value.key == "model.vocab_size" and "recall" in str(info.value) and "34" in str(info.value)
    with pytest.raises(ConfigError) as info:
        train.run(lc.compose([*common, "data=recall", "task.seq_len=20"]))
    assert info.value.key == "task.seq_len"
    with pytest.raises(ConfigError) as info:
        train.run(lc.compose([*common, "data=sort", "topology=encoder_only"]))
    assert info.value.key == "data" and "encoder_only" in str(info.value)
    assert not out.exists()


# ------------------------------------------------------------- a short training run


def test_short_recall_run_records_accuracy(tmp_path):
    steps = 6
    cfg = lc.compose([*TINY, "data=recall", "data.num_pairs=2", "data.num_queries=2", "data.min_distance=4",
                      f"task.steps={steps}", "task.batch_size=4", "task.eval_every=3", "task.eval_batches=2",
                      "task.progress=false", "task.checkpoint=false", "compile=eager", f"task.output={tmp_path}"])
    summary = train.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 3, 6]
    for r in evals:
        assert 0.0 <= r["val_sequence_accuracy"] <= r["val_accuracy"] <= 1.0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["final_val_accuracy"] == evals[-1]["val_accuracy"]
    assert summary["initial_val_accuracy"] == evals[0]["val_accuracy"]
    assert summary["chance_accuracy"] == pytest.approx(1 / cfg.data.num_values)
    assert summary["data"] == "recall" and summary["seq_len"] == 2 * 2 + 2 + 2 * 2 - 1  # pairs, gap, queries
    assert summary["task"]["seq_len"] == summary["seq_len"]
    # 2 layers of GQA with 2 KV heads of 16 dims, keys and values in fp32
    assert summary["kv_cache_bytes_per_token"] == 2 * 2 * 2 * 16 * 4
    assert summary["peak_memory_bytes"] > 0 and summary["peak_memory_measure"].startswith("process_peak_rss")

