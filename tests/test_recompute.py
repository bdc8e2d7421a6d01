"""Activation checkpointing (task.activation_checkpointing): the gradients are those of
the model without it; `full` runs the blocks' forward again in the backward, `selective`
recomputes only what lies between the kept matrix products."""

from __future__ import annotations

import contextlib
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.model.compiler import compile as compile_model
from llmarch_compose.train import recompute

SMALL = ["model.d_model=64", "model.n_layers=3", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=128",
         "model.max_seq_len=64", "model.vocab_size=128"]


def model_for(mode: str, compiled: bool = False, *extra: str):
    torch.manual_seed(0)
    model = lc.build(lc.compose([*SMALL, *extra]))
    forward = compile_model(model) if compiled else model
    recompute.apply(model, mode)
    return model, forward


class OpCounter(TorchDispatchMode):
    """How many times each aten op runs."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def step(model, forward, x, count: bool = True) -> tuple[Counter, dict[str, torch.Tensor]]:
    """(the aten ops the backward pass ran, eager only; the gradients)."""
    loss = F.cross_entropy(forward(x).logits.flatten(0, 1), x.roll(-1, 1).flatten())
    counter = OpCounter()
    with counter if count else contextlib.nullcontext():
        loss.backward()
    return counter.counts, {name: p.grad.clone() for name, p in model.named_parameters()}


X = torch.randint(0, 128, (4, 48), generator=torch.Generator().manual_seed(1))
PRODUCTS = ("mm", "addmm", "bmm")


@pytest.mark.parametrize("extra", [(), pytest.param(("attention=mla", "model.kv_lora_rank=16"), marks=pytest.mark.slow),
                                   pytest.param(("ffn=moe", "model.n_experts=4", "model.experts_per_token=2"),
                                                marks=pytest.mark.slow)])
def test_gradients_equal_and_what_the_backward_recomputes(extra):
    ops, grads = {}, {}
    for mode in recompute.MODES:
        ops[mode], grads[mode] = step(*model_for(mode, False, *extra), X)
    for mode in ("full", "selective"):
        for name, g in grads["none"].items():
            torch.testing.assert_close(grads[mode][name], g, rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    products = {mode: sum(ops[mode][op] for op in PRODUCTS) for mode in recompute.MODES}
    # full runs every block's forward again, products included; selective keeps the products
    # and recomputes only the cheap ops around them.
    assert products["full"] > products["none"] == products["selective"]
    assert sum(ops["selective"].values()) > sum(ops["none"].values())
    assert sum(ops["full"].values()) > sum(ops["selective"].values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_blocks_checkpoint_with_the_same_gradients(mode):
    _, reference = step(*model_for("none", True), X, count=False)
    _, grads = step(*model_for(mode, True), X, count=False)
    for name, g in reference.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_mode_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"task\.activation_checkpointing='some'.*Valid: none, full, selective"):
        recompute.apply(lc.build(lc.compose(SMALL)), "some")
