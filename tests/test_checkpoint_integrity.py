"""A checkpoint loads as the model that was saved, or not at all: flipped bits, NaN
weights, truncated or foreign files, missing, extra or misshapen tensors and a config
from another model are each an error naming the file and the tensor. The corrupt
folders are made here from one tiny saved checkpoint."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import llmarch_compose as lc
from llmarch_compose.artifacts.checkpoint import (CHECKSUMS, CONFIG, WEIGHTS, CheckpointError, load_checkpoint,
                                                  save_checkpoint)
from llmarch_compose.artifacts.reading import UnreadableFile

TINY_MODEL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
              "model.vocab_size=64", "model.max_seq_len=32"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = lc.compose(TINY_MODEL)
    model = lc.build(cfg)
    folder = save_checkpoint(model, cfg, tmp_path_factory.mktemp("good") / "checkpoint")
    return folder, model


@pytest.fixture
def copy(saved, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved[0], folder)
    return folder


def a_tensor(folder) -> str:
    return sorted(load_file(folder / WEIGHTS))[0]


def rewrite(folder, change, checksums: bool) -> None:
    """Store `change(tensors)`; with `checksums`, recompute checksums.json to match it
    (a file that is wrong on purpose, not corrupt on the way)."""
    tensors = change(load_file(folder / WEIGHTS))
    save_file(tensors, folder / WEIGHTS)
    if checksums:
        from llmarch_compose.artifacts.checkpoint import _digest
        sums = {name: _digest(t) for name, t in load_file(folder / WEIGHTS).items()}
        (folder / CHECKSUMS).write_text(json.dumps(sums))
    else:
        (folder / CHECKSUMS).unlink()


def test_a_saved_checkpoint_loads_the_same_weights_and_lists_every_tensor(saved):
    folder, model = saved
    sums = json.loads((folder / CHECKSUMS).read_text())
    assert set(sums) == set(load_file(folder / WEIGHTS)) and all(len(v) == 64 for v in sums.values())
    _, loaded = load_checkpoint(folder)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_a_flipped_bit_names_the_tensor(copy):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-5] ^= 0x10  # the last tensor's bytes, past the header
    (copy / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor '.+' does not hold the bytes that were "
                                              r"saved"):
        load_checkpoint(copy)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_name(copy, value):
    name = a_tensor(copy)

    def poison(tensors):
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = value
        return tensors

    rewrite(copy, poison, checksums=True)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' holds NaN or infinite values"):
        load_checkpoint(copy)


@pytest.mark.parametrize("kind", ["truncated", "pickle", "empty"])
def test_a_file_that_is_no_safetensors_names_the_file(copy, kind):
    file = copy / WEIGHTS
    if kind == "truncated":
        file.write_bytes(file.read_bytes()[:200])
    elif kind == "pickle":
        file.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    else:
        file.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_checkpoint(copy)


def test_a_missing_tensor_is_named_with_or_without_checksums(copy):
    name = a_tensor(copy)
    tensors = load_file(copy / WEIGHTS)
    save_file({k: v for k, v in tensors.items() if k != name}, copy / WEIGHTS)
    with pytest.raises(CheckpointError, match=rf"lacks tensor\(s\) \['{name}'\]"):
        load_checkpoint(copy)
    (copy / CHECKSUMS).unlink()  # a checkpoint from before checksums: the loader still names it
    with pytest.raises(CheckpointError, match=rf"does not hold the model .*{name}"):
        load_checkpoint(copy)


def test_an_extra_tensor_is_named(copy):
    rewrite(copy, lambda t: {**t, "blocks.9.attn.q.weight": torch.zeros(2, 2)}, checksums=False)
    with pytest.raises(CheckpointError, match=r"does not hold the model .*blocks\.9\.attn\.q\.weight"):
        load_checkpoint(copy)
    rewrite(copy, lambda t: t, checksums=True)
    (copy / CHECKSUMS).write_text(json.dumps({**json.loads((copy / CHECKSUMS).read_text()), "x": "0"}))
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\) \['x'\] listed in checksums\.json"):
        load_checkpoint(copy)


def test_a_misshapen_tensor_is_named(copy):
    name = a_tensor(copy)
    rewrite(copy, lambda t: {**t, name: torch.zeros(3, *t[name].shape[1:])}, checksums=True)
    with pytest.raises(CheckpointError, match=rf"does not hold the model .*{name}"):
        load_checkpoint(copy)


def test_a_config_from_another_model_is_refused(copy):
    (copy / CONFIG).write_text((copy / CONFIG).read_text().replace("d_model: 32", "d_model: 48"))
    with pytest.raises(CheckpointError, match=r"does not hold the model .*config\.yaml describes.*size mismatch"):
        load_checkpoint(copy)


def test_unreadable_checksums_name_their_file(copy):
    (copy / CHECKSUMS).write_text("{not json")
    with pytest.raises(CheckpointError, match=r"checksums\.json: not valid JSON"):
        load_checkpoint(copy)
    (copy / CHECKSUMS).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"checksums\.json: not a JSON object"):
        load_checkpoint(copy)
    (copy / CONFIG).write_text("model: [unclosed")
    with pytest.raises(UnreadableFile, match=r"config\.yaml: not valid YAML"):
        load_checkpoint(copy)


@pytest.mark.slow  # starts the command line
def test_the_command_line_names_the_corrupt_tensor_in_one_line(copy, tmp_path):
    data = bytearray((copy / WEIGHTS).read_bytes())
    data[-5] ^= 0x10
    (copy / WEIGHTS).write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "llmarch_compose", "task=export_hf", f"task.checkpoint={copy}",
                           f"task.output={tmp_path / 'hf'}", f"hydra.run.dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("llmarch: error: ") and "does not hold the bytes that were saved" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "hf").exists()


def test_a_save_of_non_finite_weights_publishes_nothing(saved, tmp_path):
    folder, model = saved
    target = tmp_path / "checkpoint"
    shutil.copytree(folder, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    cfg = lc.compose(TINY_MODEL)
    broken = lc.build(cfg)
    with torch.no_grad():
        next(broken.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or infinite values"):
        save_checkpoint(broken, cfg, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the earlier checkpoint stands
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # no temporary folder left
