"""The benchmarks' CPU limit, a step's matrix products alone, lists exactly the products the
step runs: checked against the matrix products autograd and the decoding path dispatch
for a small model (SDPA's math backend, which writes attention out as batched products)."""

from collections import Counter

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch_compose as lc
from llmarch_compose.bench.products import matrix_products, prefill_products, training_products

aten = torch.ops.aten
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96",
         "model.vocab_size=128", "model.max_seq_len=64"]


class Products(TorchDispatchMode):
    """The (rows, inner, cols) of every mm and (batch, rows, inner, cols) of every bmm dispatched."""

    def __init__(self):
        super().__init__()
        self.mm, self.bmm = Counter(), Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (aten.mm.default, aten.addmm.default):
            a, b = args[-2:] if func is aten.mm.default else args[1:3]
            self.mm[(a.shape[0], a.shape[1], b.shape[1])] += 1
        elif func is aten.bmm.default:
            a, b = args
            self.bmm[(a.shape[0], a.shape[1], a.shape[2], b.shape[2])] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("attention", ["gqa", "mha", "swa"])
def test_training_products_are_the_steps(attention):
    cfg = lc.compose([*SMALL, f"attention={attention}", "model.window=8"] if attention == "swa"
                     else [*SMALL, f"attention={attention}"])
    torch.manual_seed(0)
    model = lc.build(cfg)
    x = torch.randint(0, 128, (2, 24))
    with sdpa_kernel(SDPBackend.MATH), Products() as seen:
        loss, _ = model.objective.loss(model, x, x.roll(-1, 1), 128)
        loss.backward()
    mm, bmm = training_products(model, 2, 24)
    assert Counter(mm) == seen.mm
    assert Counter(bmm) == seen.bmm


def test_prefill_products_are_the_prefills():
    torch.manual_seed(0)
    model = lc.build(lc.compose(SMALL)).eval()
    x = torch.randint(0, 128, (2, 24))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), Products() as seen:
        model.decode_step(x, model.new_decode_state(2, 24))
    mm, bmm = prefill_products(model, 2, 24)
    assert Counter(mm) == seen.mm
    assert Counter(bmm) == seen.bmm


@pytest.mark.parametrize("overrides", [["ffn=moe"], ["attention=mla"], ["model=t5_small", "scale=tiny"]])
def test_products_unknown_for_other_layers(overrides):
    """MoE experts, MLA's split heads and cross-attention are products the lists do not
    hold: no reference rather than a short one."""
    model = lc.build(lc.compose([*SMALL, *overrides] if "scale=tiny" not in overrides else overrides))
    assert training_products(model, 2, 16) is None
    assert prefill_products(model, 2, 16) is None


def test_matrix_products_runs_each_product():
    with Products() as seen:
        matrix_products(([(4, 3, 5), (4, 3, 5), (2, 7, 1)], [(3, 4, 2, 6)]), torch.device("cpu"), torch.float32)()
    assert seen.mm == Counter({(4, 3, 5): 2, (2, 7, 1): 1})
    assert seen.bmm == Counter({(3, 4, 2, 6): 1})
