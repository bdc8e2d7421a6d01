"""Benchmark: the `moe` layer (grouped dispatch) against transformers'
MixtralSparseMoeBlock with the same weights, forward + backward, fp32 on the CPU.

    python benchmarks/bench_moe.py [--tokens 4096] [--steps 5] [--json out.json]

The implementations run alternately in one process (ours eager, ours compiled
with fullgraph, transformers' block with its default experts loop, and with its
`grouped_mm` experts implementation), after their outputs are checked to match;
the table gives median step times. It also reports the rate of the expert
matrix products: their FLOPs over the time spent inside the grouped products
(from the profiler), against the same matrix shapes run as plain `torch.mm`
calls and a 2048-cube matmul, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import llmarch_compose as lc
from llmarch_compose.artifacts.atomic import write_atomic
from llmarch_compose.registry.ffn.moe import dispatch


def build_ours(args) -> torch.nn.Module:
    cfg = lc.compose(["ffn=moe", "activation=swiglu", f"model.d_model={args.width}", f"model.ffn_dim={args.ffn}",
                      f"model.n_experts={args.experts}", f"model.experts_per_token={args.top_k}",
                      "model.router_aux_loss_coef=0.0"])
    torch.manual_seed(0)
    moe = lc.BuildContext(lc.resolve_spec(cfg)).build("ffn", layer_idx=0)
    with torch.no_grad():  # weights large enough that the outputs are not tiny
        for p in moe.parameters():
            p.normal_(std=args.width ** -0.5)
    return moe


def build_transformers(ours, args, experts_implementation="eager") -> torch.nn.Module:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=args.width, intermediate_size=args.ffn, num_local_experts=args.experts,
                           num_experts_per_tok=args.top_k, hidden_act="silu", router_jitter_noise=0.0)
    config._experts_implementation = experts_implementation
    block = MixtralSparseMoeBlock(config)
    with torch.no_grad():  # ours: w_in [e, d, gate|up], w_out [e, f, d]; theirs: [e, out, in]
        block.gate.weight.copy_(ours.router.weight)
        block.experts.gate_up_proj.copy_(ours.w_in.transpose(1, 2))
        block.experts.down_proj.copy_(ours.w_out.transpose(1, 2))
    return block


def step_fn(module, unwrap):
    def step(x, g):
        for p in module.parameters():
            p.grad = None
        out = unwrap(module(x))
        out.backward(g)
        return out
    return step


def timed(fn, *a, **kw) -> float:
    start = time.perf_counter()
    fn(*a, **kw)
    return time.perf_counter() - start


def expert_flops(slots: int, d: int, f: int) -> float:
    """Forward + backward FLOPs of the gated experts' products over `slots` rows."""
    forward = 2 * slots * d * 2 * f + 2 * slots * f * d
    return 3 * forward


def grouped_op_seconds(step, x, g) -> float:
    """Seconds spent inside the grouped products (forward and backward) in one step."""
    names = ("llmarch::grouped_mm", "llmarch::grouped_mm_weight_grad", "aten::_grouped_mm")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(x, g)
    total_us = sum(e.cpu_time_total for e in prof.key_averages() if e.key in names)
    return total_us / 1e6


def plain_mm_seconds(offsets: list[int], d: int, f: int, repeats: int) -> float:
    """Median time of the same matrix products as plain torch.mm on preallocated tensors."""
    sizes = [b - a for a, b in zip([0, *offsets[:-1]], offsets) if b > a]
    shapes = []  # (m, k, n) of every product: forward, rows' gradient, weights' gradient
    for n in sizes:
        shapes += [(n, d, 2 * f), (n, f, d),  # forward
                   (n, d, f), (n, 2 * f, d),  # rows' gradients
                   (f, n, d), (d, n, 2 * f)]  # weights' gradients
    mats = [(torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)) for m, k, n in shapes]

    def run():
        for a, b, out in mats:
            torch.mm(a, b, out=out)
    run()
    return statistics.median(timed(run) for _ in range(repeats))


def cube_rate(repeats: int, n: int = 2048) -> float:
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)
    return 2 * n ** 3 / statistics.median(timed(torch.mm, a, b, out=out) for _ in range(repeats))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1408)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per implementation (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    ours = build_ours(args)
    theirs = build_transformers(ours, args)
    theirs_grouped = build_transformers(ours, args, "grouped_mm")
    x = torch.randn(1, args.tokens, args.width)
    g = torch.randn_like(x)
    with torch.no_grad():
        want = theirs(x)
        for name, got in (("ours", ours(x).output), ("transformers grouped_mm", theirs_grouped(x))):
            err = (got - want).abs().max().item()
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()):
                sys.exit(f"outputs differ from transformers' block ({name}): max abs error {err:.3g}")
            print(f"{name}: output matches transformers' block (max abs error {err:.2e}, largest output "
                  f"{want.abs().max().item():.3g})", file=sys.stderr)

    compiled = torch.compile(ours, fullgraph=True)
    impls = {
        "ours, eager": step_fn(ours, lambda o: o.output),
        "ours, compiled (fullgraph)": step_fn(compiled, lambda o: o.output),
        "transformers MixtralSparseMoeBlock (default experts loop)": step_fn(theirs, lambda o: o),
        "transformers MixtralSparseMoeBlock (experts_implementation=grouped_mm)": step_fn(theirs_grouped,
                                                                                         lambda o: o),
    }
    impls["transformers MixtralSparseMoeBlock (default experts loop)"](x, g)
    start = time.perf_counter()
    check_same(impls["ours, compiled (fullgraph)"](x, g), want, ours, theirs, "ours, compiled")
    print(f"compiled in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    check_same(impls["ours, eager"](x, g), want, ours, theirs, "ours, eager")
    times = {name: [] for name in impls}
    for i in range(args.warmup + args.steps):
        for name, step in impls.items():  # alternate, so a load change hits every implementation alike
            t = timed(step, x, g)
            if i >= args.warmup:
                times[name].append(t)
    median = {name: statistics.median(ts) for name, ts in times.items()}

    slots = args.tokens * args.top_k
    flops = expert_flops(slots, args.width, args.ffn)
    with torch.no_grad():
        offsets = dispatch(ours.route(x.reshape(-1, args.width)).chosen, args.experts).offsets.tolist()
    inside = grouped_op_seconds(impls["ours, eager"], x, g)
    plain = plain_mm_seconds(offsets, args.width, args.ffn, args.steps)
    cube = cube_rate(args.steps)
    baseline = median["transformers MixtralSparseMoeBlock (default experts loop)"]
    result = dict(
        config=dict(tokens=args.tokens, width=args.width, ffn=args.ffn, experts=args.experts, top_k=args.top_k,
                    dtype="float32", threads=torch.get_num_threads(), torch=torch.__version__,
                    load_average=os.getloadavg()[0]),
        step_seconds={n: dict(median=median[n], all=times[n], speedup_vs_transformers=baseline / median[n])
                      for n in impls},
        expert_matmul=dict(flops=flops, group_rows=[b - a for a, b in zip([0, *offsets[:-1]], offsets)],
                           in_grouped_ops_gflops=flops / inside / 1e9, plain_mm_same_shapes_gflops=flops / plain / 1e9,
                           fraction_of_plain_mm=plain / inside, whole_step_gflops=flops / median["ours, eager"] / 1e9,
                           cube_2048_gflops=cube / 1e9),
    )
    print_table(result)
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2))
    return result


def check_same(out, want, ours, theirs, name) -> None:
    """Outputs and gradients (after one step of each) equal transformers' block's."""
    pairs = [("output", out.detach(), want), ("router gradient", ours.router.weight.grad, theirs.gate.weight.grad),
             ("w_in gradient", ours.w_in.grad.transpose(1, 2), theirs.experts.gate_up_proj.grad),
             ("w_out gradient", ours.w_out.grad.transpose(1, 2), theirs.experts.down_proj.grad)]
    for what, a, b in pairs:
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item()):
            sys.exit(f"{name}: {what} differs from transformers' block: max abs error {(a - b).abs().max():.3g}")
    print(f"{name}: output and gradients match transformers' block", file=sys.stderr)


def print_table(r: dict) -> None:
    c, m = r["config"], r["expert_matmul"]
    print(f"\nMoE layer, {c['tokens']} tokens, width {c['width']}, FFN {c['ffn']}, {c['experts']} experts, "
          f"top-{c['top_k']}, {c['dtype']}, forward + backward, {c['threads']} threads, torch {c['torch']}, "
          f"load average {c['load_average']:.1f}\n")
    print("| implementation | median step (s) | speed-up vs transformers |")
    print("|---|---:|---:|")
    for name, s in r["step_seconds"].items():
        print(f"| {name} | {s['median']:.3f} | {s['speedup_vs_transformers']:.2f}x |")
    print(f"\n| expert matrix products ({m['flops'] / 1e9:.1f} GFLOP per step) | GFLOP/s |")
    print("|---|---:|")
    print(f"| inside the grouped products (eager step, profiler) | {m['in_grouped_ops_gflops']:.1f} |")
    print(f"| the same shapes as plain torch.mm | {m['plain_mm_same_shapes_gflops']:.1f} |")
    print(f"| over the whole eager step | {m['whole_step_gflops']:.1f} |")
    print(f"| 2048-cube torch.mm | {m['cube_2048_gflops']:.1f} |")
    print(f"\ngrouped products at {100 * m['fraction_of_plain_mm']:.0f}% of plain torch.mm on the same shapes; "
          f"rows per expert {m['group_rows']}")


if __name__ == "__main__":
    main()
