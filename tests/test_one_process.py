"""Any number of models compiled in one process, as an in-process ablation, a
notebook or a Hydra basic-launcher sweep does: what was compiled before a model
does not count against the recompile limit of its blocks.

These tests keep Dynamo's state between the models on purpose: the conftest reset
around every test is turned off for this module, and nothing here resets."""

from __future__ import annotations

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose.tasks import train
from preset_cases import DISTINCT_AT_TINY

SMALL = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
         "model.vocab_size=64", "model.max_seq_len=16"]
# Each builds a block that Dynamo must compile anew (another type or structure).
VARIANTS = [[], ["activation=gelu"], ["norm=layernorm"], ["attention=mqa", "position=learned"]]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Overrides conftest's reset: the graphs of earlier models stay in the process."""
    yield


def assert_matches_eager(model: torch.nn.Module, compiled: torch.nn.Module, vocab: int, what: str) -> None:
    ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits  # regional: the blocks are compiled in place, so eager runs first
        got = compiled(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.slow
def test_more_presets_than_the_recompile_limit_compile_in_one_process():
    """Before each model had its own block code, about the tenth preset failed with
    FailOnRecompileLimitHit (fullgraph=True): the blocks of every earlier model had
    used up Dynamo's recompile limit (8) of the shared `Block.forward`. Here the limit is
    4 and six distinct presets compile (test_all_presets compiles each of them alone)."""
    with torch._dynamo.config.patch(recompile_limit=4):
        for preset in DISTINCT_AT_TINY[:6]:
            cfg = lc.compose([f"model={preset}", "scale=tiny"])
            torch.manual_seed(0)
            model = lc.build(cfg).eval()
            vocab = lc.resolve_spec(cfg).model.vocab_size
            ids = torch.randint(0, vocab, (1, 8), generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                expected = model(ids).logits
                got = lc.compile(model)(ids).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{preset}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("regional", [True, False], ids=["regional", "whole"])
def test_earlier_models_do_not_count_against_the_recompile_limit(regional):
    """With a recompile limit of one, every model still compiles: each has its own cache.
    The same model compiled twice gets fresh code too, and its first compile keeps working."""
    with torch._dynamo.config.patch(recompile_limit=1):
        models = []
        for overrides in VARIANTS:
            cfg = lc.compose([*SMALL, *overrides])
            torch.manual_seed(0)
            model = lc.build(cfg).eval()
            compiled = lc.compile(model, regional=regional)
            assert_matches_eager(model, compiled, 64, " ".join(overrides) or "default")
            models.append((model, compiled))
        for model, compiled in models:  # the earlier models' graphs are still there and still serve
            assert_matches_eager(model, compiled, 64, "again")


@pytest.mark.slow
def test_compiled_training_runs_share_a_process(tmp_path):
    """Jobs of a basic-launcher sweep run one after another in one process, with no reset
    between them. The limit is what one run needs (a graph for training, one for no-grad
    evaluation): every job fits only if the earlier jobs' graphs are not counted."""
    with torch._dynamo.config.patch(recompile_limit=2):
        for i, overrides in enumerate(VARIANTS[:3]):
            cfg = lc.compose([*SMALL, *overrides, "model.vocab_size=256", "compile=default", "task.steps=2", "task.batch_size=2",
                              "task.seq_len=16", "task.eval_every=2", "task.eval_batches=1", "task.progress=false",
                              f"task.output={tmp_path / str(i)}"])
            summary = train.run(cfg)
            assert summary["steps"] == 2 and summary["compile"] == "default"
