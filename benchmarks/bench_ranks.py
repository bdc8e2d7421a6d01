"""Scaling over processes on one machine: training tokens/s per core of one process (one
thread) against two torchrun ranks (one thread each, Gloo: DDP, FSDP2, and FSDP2 keeping
each block gathered from its forward to its backward) at the same per-rank batch, and the
cost of the gradient all-reduce alone. The model and batch are the reference shape of
bench_llama.py (512 wide, 8 layers, batch 8 x 256 per rank). Runs one after another;
extra Hydra overrides on the command line are applied to every run:

    python benchmarks/bench_ranks.py task.steps=20

Prints a Markdown table; the goal is two ranks within 10% of one process per core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_llama import SHAPE  # the script's folder is on the path when it runs

RUN = ["task.steps=10", "task.batch_size=8", "task.seq_len=256", "task.eval_every=1000", "task.eval_batches=1",
       "task.progress=false", "task.checkpoint=false"]
GOAL = 0.90  # two ranks' tokens/s per core at least this fraction of one process's


def train(out: Path, ranks: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "llmarch_compose"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
        "llmarch_compose"]
    subprocess.run([*launcher, *SHAPE, *RUN, f"task.output={out}", *extra], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def allreduce_seconds(numel: int, rounds: int = 20) -> float:
    """The median time of one all-reduce of `numel` fp32 values over two Gloo ranks."""
    code = f"""
import os, statistics, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones({numel})
times = []
for _ in range({rounds}):
    dist.barrier(); t = time.perf_counter(); dist.all_reduce(x); times.append(time.perf_counter() - t)
if dist.get_rank() == 0:
    print(statistics.median(times))
dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "--no-python", sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True,
                          capture_output=True, text=True)
    return float(done.stdout.strip().splitlines()[-1])


def main(extra: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        one = train(Path(tmp, "one"), 1, extra)
        base = one["tokens_per_s"]
        rows.append(("one process, 1 thread", 1, base, base))
        for name, strategy in (("ddp", ["parallel=ddp"]), ("fsdp2", ["parallel=fsdp2"]),
                               ("fsdp2, reshard_after_forward=false",
                                ["parallel=fsdp2", "parallel.reshard_after_forward=false"])):
            summary = train(Path(tmp, name.split(",")[0] + str(len(rows))), 2, [*strategy, *extra])
            rows.append((f"2 ranks, {name}, 1 thread each", 2, summary["tokens_per_s"],
                         summary["tokens_per_s"] / 2))
        step_s = one["tokens_per_s"] and one["global_batch_tokens"] / one["tokens_per_s"]
        reduce_s = allreduce_seconds(one["params_total"])
    print(f"Training step, {one['params_total']:,} parameters, batch {one['global_batch_sequences']} x "
          f"{one['seq_len']} per rank, compiled, fp32 ({time.strftime('%Y-%m-%d')})\n")
    print("| run | cores | tokens/s | tokens/s per core | vs one process |")
    print("|---|---:|---:|---:|---:|")
    for name, cores, total, per_core in rows:
        print(f"| {name} | {cores} | {total:,.0f} | {per_core:,.0f} | {per_core / base:.2f}x |")
    print(f"\nOne Gloo all-reduce of the gradients ({one['params_total'] * 4 / 2**20:.1f} MiB fp32): "
          f"{reduce_s * 1e3:.1f} ms, {reduce_s / step_s:.1%} of one process's step ({step_s * 1e3:.0f} ms).")
    worst = min(per_core / base for _, cores, _, per_core in rows if cores == 2)
    print(f"Goal: two ranks per core >= {GOAL:.2f}x one process: {'met' if worst >= GOAL else 'missed'} "
          f"(worst {worst:.2f}x).")


if __name__ == "__main__":
    main(sys.argv[1:])
