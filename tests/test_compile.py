"""The compile stage: regional and whole-model `torch.compile` (fullgraph) match
eager on outputs and gradients, and training steps do not recompile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo import convert_frame
from torch._dynamo.utils import counters

import llmarch_compose as lc
from llmarch_compose import ConfigError

VOCAB = 128  # conftest's TINY vocabulary
SEQ = 16

COMBOS = {
    "default": [],
    "moe": ["ffn=moe"],
    "swa": ["attention=swa", "model.window=8"],
    "sinusoidal-layernorm-gelu": ["position=sinusoidal", "norm=layernorm", "activation=gelu"],
    "learned": ["position=learned"],
    "post-norm": ["topology.norm_position=post"],
    "parallel-mqa": ["topology.parallel_residual=true", "attention=mqa"],
    "rope-llama3": ["model.rope_scaling={type:llama3,factor:8,original_max_seq_len:32}"],
    "mla-alibi": ["attention=mla", "position=alibi"],  # score bias on an unrotated latent attention
}


def loss_of(out: lc.ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    return loss + out.aux_loss if out.aux_loss is not None else loss


def assert_same(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


# The whole model compiled as one graph: every preset is (test_all_presets); here the
# combinations no preset makes.
WHOLE = ["mla-alibi", "sinusoidal-layernorm-gelu"]


@pytest.mark.slow
@pytest.mark.parametrize("combo, whole", [*((c, False) for c in sorted(COMBOS)), *((c, True) for c in WHOLE)],
                         ids=[*(f"{c}-regional" for c in sorted(COMBOS)), *(f"{c}-whole" for c in WHOLE)])
def test_compiled_matches_eager(tiny_cfg, combo, whole):
    cfg = tiny_cfg(*COMBOS[combo])
    torch.manual_seed(0)
    model = lc.build(cfg)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True) if whole else lc.compile(model, mode="default")
    if not whole:
        assert compiled is model  # regional: the blocks are compiled in place
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (2, SEQ), generator=g)

    out_c, out_e = compiled(x), eager(x)
    assert_same(out_c.logits, out_e.logits, "logits")
    assert (out_c.aux_loss is None) == (out_e.aux_loss is None) == (combo != "moe")
    if out_e.aux_loss is not None:
        assert_same(out_c.aux_loss, out_e.aux_loss, "aux loss")

    loss_c, loss_e = loss_of(out_c, y), loss_of(out_e, y)
    assert_same(loss_c, loss_e, "loss")
    loss_c.backward()
    loss_e.backward()
    named_e = dict(eager.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert_same(p.grad, named_e[name].grad, f"grad of {name}")
    assert not counters["graph_break"]


def _train_and_count(tiny_cfg, n_layers: int, steps: int = 4) -> list[tuple[int, int]]:
    """Regionally compiled training steps (with a no-grad evaluation between them,
    as the train task does); Dynamo's graph counters after each step."""
    torch._dynamo.reset()
    counters.clear()
    cfg = tiny_cfg(f"model.n_layers={n_layers}")
    torch.manual_seed(0)
    model = lc.build(cfg)
    compiled = lc.compile(model, mode="default")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        y = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        loss = loss_of(compiled(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            compiled(x)
        seen.append((counters["stats"]["unique_graphs"], counters["stats"]["calls_captured"]))
    assert not counters["graph_break"]
    return seen


@pytest.mark.slow
def test_training_steps_do_not_recompile_and_blocks_share_one_graph(tiny_cfg):
    two = _train_and_count(tiny_cfg, 2)
    assert two[0][0] >= 1
    assert two[-1] == two[0], f"recompiled between steps: {two}"
    four = _train_and_count(tiny_cfg, 4)
    assert four[-1] == four[0], f"recompiled between steps: {four}"
    # One block graph serves every layer: doubling the depth compiles nothing more.
    assert four[-1] == two[-1]


def test_compile_modes():
    model = lc.build(lc.compose(["model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1"]))
    assert lc.compile(model, mode="eager") is model
    with pytest.raises(ConfigError) as info:
        lc.compile(model, mode="fast")
    assert info.value.key == "compile.mode" and "max-autotune" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("combo", ["default", "moe"])
def test_no_frame_is_compiled_again_after_the_first_step(tiny_cfg, combo):
    """Training steps (forward, backward, AdamW) and no-grad evaluations, with the
    model switched to eval mode and back as an evaluation loop does: after the first
    step has seen every mode, Dynamo compiles no frame, graph or guard set again."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = lc.build(tiny_cfg(*COMBOS[combo]))
    compiled = lc.compile(model, mode="default")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)

    def snapshot() -> dict[str, object]:
        """Every Dynamo counter, the frames it converted and its per-frame compile counts."""
        return {"counters": {k: dict(v) for k, v in counters.items()},
                "frames_converted": torch._dynamo.utils.curr_frame,
                "frame_compiles": sum(convert_frame.FRAME_COMPILE_COUNTER.values())}

    seen = []
    for _ in range(3):
        x = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        y = torch.randint(0, VOCAB, (2, SEQ), generator=g)
        loss = loss_of(compiled(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            compiled(x)
        model.train()
        seen.append(snapshot())
    assert seen[0]["counters"]["stats"]["unique_graphs"] >= 1 and seen[0]["frame_compiles"] >= 1
    assert seen[1] == seen[0] and seen[2] == seen[0], f"compiled again after the first step: {seen}"
    assert not counters["graph_break"]


def test_compiled_loss_matches_eager_loss_and_gradient():
    """A training run compiles its whole-logits loss with the model; it is the eager loss,
    ignored targets included, in value and in the logits' gradient."""
    from llmarch_compose.model.compiler import CompileConfig, compile_loss
    from llmarch_compose.plugin.objectives import IGNORE, full_cross_entropy

    assert compile_loss(full_cross_entropy, CompileConfig(mode="eager")) is full_cross_entropy
    compiled = compile_loss(full_cross_entropy, CompileConfig())
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, SEQ, VOCAB, generator=g)
    targets = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    targets[0, :5] = IGNORE
    grads = []
    for loss in (full_cross_entropy, compiled):
        leaf = logits.clone().requires_grad_(True)
        value = loss(leaf, targets)
        value.backward()
        grads.append((value.detach(), leaf.grad))
    assert_same(grads[1][0], grads[0][0], "loss")
    assert_same(grads[1][1], grads[0][1], "gradient of the logits")
    assert (grads[1][1][0, :5] == 0).all()  # ignored targets give no gradient
