"""Where a training step's time goes: the reference shape of bench_llama.py, compiled,
profiled over a few steps with torch.profiler and grouped by kind of work. Extra
Hydra overrides are applied last (`task.loss_chunk_tokens=1024`,
`task.activation_checkpointing=selective`, `compile=eager`):

    python benchmarks/profile_step.py [overrides]
"""

from __future__ import annotations

import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import llmarch_compose as lc
from llmarch_compose.config.structured import to_dataclass
from llmarch_compose.model.compiler import CompileConfig, compile_from_config, compile_loss
from llmarch_compose.plugin.objectives import full_cross_entropy
from llmarch_compose.train import recompute
from llmarch_compose.train.chunked_loss import deferred_head
from llmarch_compose.train.loop import TrainSettings, optimizer_for

from bench_llama import SHAPE  # the script's folder is on the path when it runs

#: (kind, what an op's name starts with or contains), first match wins.
KINDS = (
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::_grouped_mm", "mkldnn", "aten::linear")),
    ("attention kernel", ("scaled_dot_product", "flash_attention", "flex_attention")),
    ("optimizer", ("_fused_adamw", "adamw", "Optimizer.step")),
    # Inductor's generated kernels run inside the call of their compiled graph.
    ("fused pointwise and reductions (Inductor)", ("cpp_fused", "triton_", "Call CompiledFxGraph")),
    ("zero fills", ("aten::fill_", "aten::zero_")),
    ("cross-entropy", ("log_softmax", "nll_loss", "cross_entropy")),
)


def kind_of(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k.lower() in low for k in keys)), "other")


def main(extra: list[str]) -> None:
    torch.set_num_threads(2)
    cfg = lc.compose([*SHAPE, "device=cpu", *extra])
    task = to_dataclass(TrainSettings, cfg.task, "task")
    torch.manual_seed(0)
    model = lc.build(cfg)
    settings = to_dataclass(CompileConfig, cfg.compile, "compile")
    forward = compile_from_config(model, settings)
    whole_logits_loss = compile_loss(full_cross_entropy, settings)  # as a training run compiles it
    recompute.apply(model, task.activation_checkpointing)
    optimizer = optimizer_for(model, task)
    x = torch.randint(0, cfg.model.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        with deferred_head(model, task.loss_chunk_tokens) as ce:
            loss, _ = model.objective.loss(forward, x, x.roll(-1, 1), cfg.model.vocab_size, None,
                                           ce or whole_logits_loss)
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # compile and warm up
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            totals[kind_of(event.key)] += event.self_cpu_time_total
    whole = sum(totals.values())
    print(f"Training step of {cfg.model.name} (8 x 256 tokens, fp32, 2 threads), self CPU time over 3 steps; "
          f"overrides: {' '.join(extra) or 'none'}\n")
    print("| kind | ms per step | share |")
    print("|---|---:|---:|")
    for kind, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {us / 3 / 1e3:,.1f} | {us / whole:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1:])
