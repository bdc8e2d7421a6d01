"""The chunked LM head and cross-entropy (task.loss_chunk_tokens): the loss and every
gradient equal those of the whole logits, for every kind of head, and no tensor of a
training step is as large as the batch's logits."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.plugin.objectives import CAUSAL_LM, IGNORE, MASKED_LM
from llmarch_compose.train.chunked_loss import deferred_head

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
         "model.max_seq_len=64", "model.vocab_size=300"]
HEADS = {
    "untied": [],
    "tied": ["model.tie_embeddings=true"],
    "bert (transform, bias, masked)": ["model=bert_base", "scale=tiny", "model.vocab_size=300"],
    "t5 (scaled tied head)": ["model=t5_small", "scale=tiny", "model.vocab_size=300"],
    "baichuan (normalized head)": ["model=baichuan2_13b", "scale=tiny", "model.vocab_size=300"],
}


def loss_and_grads(cfg, chunk: int, x, y):
    torch.manual_seed(0)
    model = lc.build(cfg)
    objective = model.objective
    with deferred_head(model, chunk) as cross_entropy:
        loss, ce = objective.loss(model, x, y, 300, torch.Generator().manual_seed(3), cross_entropy)
    loss.backward()
    return ce.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 7,
                                   pytest.param(64, marks=pytest.mark.slow), 10_000])
def test_chunked_loss_and_gradients_equal_the_whole_logits(head, chunk):
    cfg = lc.compose([*SMALL, *HEADS[head]])
    x = torch.randint(0, 299, (3, 20), generator=torch.Generator().manual_seed(1))
    y = x.roll(-1, 1)
    y[0, :5] = IGNORE  # targets that ask nothing are left out of the mean
    ce, grads = loss_and_grads(cfg, 0, x, y)
    chunked_ce, chunked_grads = loss_and_grads(cfg, chunk, x, y)
    torch.testing.assert_close(chunked_ce, ce, rtol=0, atol=2e-6)
    assert chunked_grads.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5, atol=1e-6, msg=name)  # float32 sums in another order


class LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_no_tensor_of_the_step_is_as_large_as_the_logits():
    model = lc.build(lc.compose([*SMALL, "model.vocab_size=4096"]))
    x = torch.randint(0, 4096, (4, 64))
    largest = {}
    for chunk in (0, 32):
        with LargestTensor() as seen, deferred_head(model, chunk) as cross_entropy:
            loss, _ = CAUSAL_LM.loss(model, x, x.roll(-1, 1), 4096, None, cross_entropy)
            loss.backward()
        largest[chunk] = seen.numel
    logits = 4 * 64 * 4096
    assert largest[0] >= logits
    assert largest[32] <= 32 * 4096 < logits / 4


def test_the_head_returns_logits_again_after_the_step():
    model = lc.build(lc.compose(SMALL))
    x = torch.randint(0, 299, (1, 8))
    with deferred_head(model, 4):
        assert model(x).logits.shape[-1] == 32  # hidden states inside
    assert model(x).logits.shape[-1] == 300


def test_bad_chunk_sizes_are_refused(tmp_path):
    from llmarch_compose.tasks import train

    with pytest.raises(ConfigError, match=r"task\.loss_chunk_tokens=-1"):
        train.run(lc.compose([*SMALL, "task.loss_chunk_tokens=-1", f"task.output={tmp_path}", "task.steps=1"]))


def test_under_autocast_the_backward_recomputes_as_the_forward_computed():
    """bf16 autocast: the chunked gradients equal those of the whole logits under the same autocast."""
    cfg = lc.compose(SMALL)
    x = torch.randint(0, 299, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for chunk in (0, 8):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(cfg, chunk, x, x.roll(-1, 1)))
    (ce, grads), (chunked_ce, chunked_grads) = results
    torch.testing.assert_close(chunked_ce, ce, rtol=0, atol=1e-5)
    for name, g in grads.items():  # both sides round products to bf16: agreement to bf16's precision
        assert (chunked_grads[name] - g).abs().max() <= 8e-3 * g.abs().max(), name
