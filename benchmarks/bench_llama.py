"""The reference benchmark: a LLaMA-style model (512 wide, 8 layers, 8 query heads
sharing 2 KV heads, FFN 1408, vocabulary 8192), batch 8 x 256 tokens, fp32, two
threads; ours eager and compiled against Hugging Face transformers on the same
weights. Extra Hydra overrides on the command line are applied last:

    python benchmarks/bench_llama.py task.steps=10 task.output=bench-out

`task=bench` measures and reports; the goals the project compares those figures
with live here (`GOALS`), printed as a table after the task's report.
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Optional

import llmarch_compose as lc
from llmarch_compose.tasks import run_task

SHAPE = ["model.name=llama-512x8", "model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=1408",
         "model.vocab_size=8192", "model.max_seq_len=256", "model.tie_embeddings=false"]
RUN = ["task=bench", "precision=fp32", "device=cpu", "task.batch_size=8", "task.seq_len=256", "task.threads=2",
       "task.compile_depths=[2,16]"]

COMPARE = {">=": operator.ge, "<=": operator.le, "<": operator.lt}
#: (what, how to compare, goal): the figures of the compiled variant the project aims for.
GOALS = (
    ("training tokens/s vs HF", ">=", 1.15),
    ("inference tokens/s vs HF", ">=", 1.15),
    ("peak training memory vs HF", "<=", 0.8),
    ("cold compile (s)", "<", 25.0),
    ("compile time, deepest / shallowest", "<=", 1.2),
    ("training FLOP rate / matmul rate", ">=", 0.95),
    ("training step / its matrix products alone", "<=", 1.10),
)


def measured(report: dict[str, Any]) -> dict[str, Optional[float]]:
    """The figure each goal is about, from a `task=bench` report (None: not measured)."""
    compiled = report["variants"].get("compiled", {})
    times = report["compile"]
    depths = sorted(times.get("by_depth") or [], key=lambda d: d["n_layers"])
    flat = None
    if len(depths) >= 2 and depths[0]["compile_s"] > 0:
        flat = depths[-1]["compile_s"] / depths[0]["compile_s"]
    cold = times.get("cold")
    return {
        "training tokens/s vs HF": compiled.get("train_vs_hf"),
        "inference tokens/s vs HF": compiled.get("infer_vs_hf"),
        "peak training memory vs HF": compiled.get("memory_vs_hf"),
        "cold compile (s)": cold["compile_s"] if cold else None,
        "compile time, deepest / shallowest": flat,
        "training FLOP rate / matmul rate": compiled.get("train_fraction_of_matmul"),
        "training step / its matrix products alone": compiled.get("train_vs_products"),
    }


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with the measured value and whether it is met (None: not measured)."""
    values = measured(report)
    out = []
    for what, op, goal in GOALS:
        value = values[what]
        met = None if value is None else COMPARE[op](value, goal)
        out.append({"target": what, "value": value, "goal": f"{op} {goal:g}", "met": met})
    return out


def render_targets(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | goal | met |", "|---|---:|---|---|"]
    for t in rows:
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "no")
        value = "n/a" if t["value"] is None else format(t["value"], ".3g")
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} |")
    return "\n".join(lines) + "\n"


def main(extra: list[str]) -> None:
    report = run_task(lc.compose([*SHAPE, *RUN, *extra]))
    print("\n" + render_targets(targets(report)), end="")


if __name__ == "__main__":
    main(sys.argv[1:])
