"""The preflight of task=train and task=bench: a run that cannot fit in memory is
refused before anything is allocated, naming the key to blame; impossible sizes fail
at once; every error message is bounded in length and computed in bounded time."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.errors import valid_divisors, valid_range
from llmarch_compose.model import card
from llmarch_compose.tasks import run_task

TRAIN = ["task.steps=1", "task.batch_size=2", "task.seq_len=16", "task.eval_batches=1", "task.progress=false",
         "compile=eager"]
FAST_S = 10.0  # a refusal takes well under a second; generous for a loaded machine


def refused(overrides: list[str]) -> tuple[ConfigError, float]:
    start = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        run_task(lc.compose(overrides))
    return info.value, time.perf_counter() - start


# ------------------------------------------------------------------ bounded messages


def test_valid_divisors_lists_few_and_bounds_many():
    assert valid_divisors(8, 3) == [1, 2, 4, 8]
    assert valid_divisors(256, 7) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    start = time.perf_counter()
    many = valid_divisors(10**9, 3)
    prime = valid_divisors(10**18 + 3, 7)  # trial division would take hours
    assert time.perf_counter() - start < 2.0
    assert many == "a divisor of 1000000000, e.g. 1, 2, 4, 5, 8, 10"
    assert prime.startswith(f"a divisor of {10**18 + 3}, e.g. 1") and len(prime) < 200


def test_valid_range_lists_few_and_bounds_many():
    assert valid_range(1, 4) == [1, 2, 3, 4]
    assert valid_range(1, 10**8) == "an integer in 1..100000000"


@pytest.mark.parametrize("overrides, key", [
    (["model.n_layers=100000"], "model.n_layers"),
    (["model.d_model=1000000000"], "model.d_model"),
    (["model.d_model=1000000000", "model.n_heads=3"], "model.d_model"),
    (["model.d_model=1048576", "model.n_heads=3"], "model.n_heads"),
    (["model.head_dim=1000000000"], "model.head_dim"),
    (["ffn=moe", "model.n_experts=1000000", "model.experts_per_token=1000001"], "model.experts_per_token"),
    (["ffn=moe", "model.n_experts=1000000", "model.n_expert_groups=7"], "model.n_expert_groups"),
    (["model.n_heads=65536", "model.head_dim=64", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["model.vocab_size=10000000000"], "model.vocab_size"),
    (["ffn=moe", "model.n_experts=10000000"], "model.n_experts"),
])
def test_impossible_sizes_fail_at_once_with_a_short_message(overrides, key):
    error, seconds = refused(["task=summary", *overrides])
    assert error.key == key
    assert seconds < FAST_S and len(str(error)) < 400, (seconds, str(error))


# ------------------------------------------------------------------ the estimate


def test_available_memory_on_cpu_and_its_fallback(monkeypatch, tmp_path):
    cpu = torch.device("cpu")
    found = card.available_memory(cpu)
    assert found is not None and found > 0
    monkeypatch.setattr(card, "MEMINFO", tmp_path / "absent")
    fallback = card.available_memory(cpu)
    assert fallback is not None and fallback > 0
    assert card.available_memory(torch.device("meta")) is None


def test_available_memory_on_cuda_is_the_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (123 << 20, 80 << 30))
    assert card.available_memory(torch.device("cuda", 0)) == 123 << 20


def _saved_bytes(model: torch.nn.Module, ids: torch.Tensor) -> int:
    """The bytes autograd keeps for the backward pass of a training step (parameters aside)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(ids)
        F.cross_entropy(out.logits.flatten(0, 1).float(), ids.flatten()).backward()
    return sum(storages.values())


@pytest.mark.parametrize("overrides", [[], ["ffn=moe"], ["model=gpt2"], ["model=t5_small"],
                                       ["topology.share_layers=true"]], ids=lambda o: " ".join(o) or "default")
def test_activation_estimate_covers_what_autograd_keeps(overrides):
    cfg = lc.compose([*TINY, *overrides])
    spec = lc.resolve_spec(cfg)
    batch, seq = 4, 32
    needs = card.run_memory(spec, batch, seq, torch.float32)
    model = lc.build(spec)
    ids = torch.randint(0, spec.model.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    kept = _saved_bytes(model, ids)
    assert 0 < kept <= needs["activations"] + needs["logits"], (kept, needs)
    params = sum(p.numel() for p in card.unique_parameters(model))
    assert (needs["weights"], needs["adamw_states"]) == (4 * params, 8 * params)


def test_bf16_weights_halve_the_state():
    spec = lc.resolve_spec(lc.compose(TINY))
    fp32, bf16 = (card.run_memory(spec, 2, 16, dtype) for dtype in (torch.float32, torch.bfloat16))
    assert bf16["weights"] * 2 == fp32["weights"] and bf16["adamw_states"] * 2 == fp32["adamw_states"]


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("overrides, key", [
    (["task.batch_size=100000000"], "task.batch_size"),
    (["model.vocab_size=10000000"], "model.vocab_size"),
    (["ffn=moe", "model.n_experts=1000000"], "model.n_experts"),
    (["model.d_model=1048576", "model.n_heads=8"], "model.d_model"),
    (["model.n_layers=2000", "model.d_model=64", "model.n_heads=4", "model.ffn_dim=64",
      "task.batch_size=64", "task.seq_len=256"], "model.n_layers"),
])
def test_train_refuses_a_run_that_cannot_fit_before_allocating(tmp_path, overrides, key):
    out = tmp_path / "never"
    error, seconds = refused([*TRAIN, f"task.output={out}", *overrides])
    assert error.key == key, str(error)
    message = str(error)
    assert "the run needs about" in message and "is available on cpu" in message and "activations" in message
    assert "task.batch_size" in message and "model.vocab_size" in message
    assert ("model.n_experts" in message) == ("ffn=moe" in overrides)
    assert seconds < FAST_S and len(message) < 600
    assert not out.exists()


def test_the_refusal_compares_with_what_is_available(tmp_path, monkeypatch):
    monkeypatch.setattr(card, "available_memory", lambda device: 1 << 20)
    out = tmp_path / "never"
    error, _ = refused([*TINY, *TRAIN, "model.vocab_size=256", "task.batch_size=64", "task.seq_len=64",
                        f"task.output={out}"])
    assert error.key == "task.batch_size" and error.value == 64
    assert "and 1.00 MiB is available on cpu" in str(error)
    assert not out.exists()


def test_a_run_that_fits_passes():
    spec = lc.resolve_spec(lc.compose(TINY))
    needs = card.preflight(spec, 2, 16, torch.float32, torch.device("cpu"))
    assert 0 < needs["total"] < needs["available"]


def test_bench_refuses_a_run_that_cannot_fit(tmp_path):
    error, seconds = refused([*TINY, "task=bench", "device=cpu", "task.batch_size=100000000", "task.seq_len=64",
                              f"task.output={tmp_path / 'never'}"])
    assert error.key == "task.batch_size" and "is available on cpu" in str(error)
    assert seconds < FAST_S and not (tmp_path / "never").exists()


def test_the_chunked_loss_and_recomputation_shrink_the_estimate(monkeypatch):
    """A 128K-vocabulary step whose logits alone exceed the memory fits once the loss runs in chunks."""
    spec = lc.resolve_spec(lc.compose([*TINY, "model.vocab_size=131072"]))
    whole = card.run_memory(spec, 8, 256, torch.float32)
    chunked = card.run_memory(spec, 8, 256, torch.float32, logit_tokens=1024)
    assert whole["logits"] == 8 * 256 * 131072 * 12 and chunked["logits"] == 1024 * 131072 * 12
    assert card.run_memory(spec, 8, 256, torch.float32, recompute="full")["activations"] < whole["activations"]
    monkeypatch.setattr(card, "available_memory", lambda device: chunked["total"] + (1 << 20))
    with pytest.raises(ConfigError, match="model.vocab_size"):
        card.preflight(spec, 8, 256, torch.float32, torch.device("cpu"))
    assert card.preflight(spec, 8, 256, torch.float32, torch.device("cpu"), logit_tokens=1024)["total"] == chunked["total"]

