"""Shared fixtures: tiny configs and a clean compiler state per test."""

from __future__ import annotations

import os

import pytest
import torch

import llmarch_compose as lc

# Under pytest-xdist every worker would otherwise take a thread per core: share the cores.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

#: Overrides that shrink any preset to a size that runs in milliseconds.
TINY = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_dim=96", "model.vocab_size=128", "model.max_seq_len=64"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Compiled tests must not see graphs or recompile counts of earlier tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def tiny_cfg():
    """compose(extra overrides) at test size."""

    def make(*overrides: str):
        return lc.compose([*TINY, *overrides])

    return make
