"""Sliding-window attention: the block-sparse FlexAttention path against full causal SDPA.

Inference (no gradients) on one attention call of the shape a layer sees, through the
project's own dispatcher (`registry/attention/gqa.py: scaled_dot_product`) and block-mask
builder (`llmarch_compose/model/masks.py: BlockMasks`), both compiled with fullgraph:

- flex window: MaskSpec(causal, window) with the stack's block mask: only the blocks
  inside the band are computed;
- sdpa causal: MaskSpec(causal), SDPA's own causal kernel (what a model without a window
  runs): the peer of the same shape;
- sdpa window (dense): the same window as a dense boolean mask through SDPA, what runs
  where FlexAttention cannot (CPU training): for reference.

The variants alternate in one process (round robin) and the medians are reported, with
the ratio of sdpa causal to flex window. The block mask is built once per shape (as the
stack does), outside the timed calls; its build time is printed apart.

    python benchmarks/bench_window.py                          # 4096 tokens, window 256, CPU fp32
    python benchmarks/bench_window.py --seq 512 --window 64 --repeats 3   # a quick check
    python benchmarks/bench_window.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from llmarch_compose import PositionInputs
from llmarch_compose.model.masks import BlockMasks, MaskSpec
from llmarch_compose.registry.attention.gqa import scaled_dot_product


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[str, Callable[[], torch.Tensor]], repeats: int, device: torch.device,
                warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each step, the steps alternating so that a change in the
    machine's load falls on all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    synchronize(device)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def attention_steps(seq: int, window: int, batch: int = 1, heads: int = 8, kv_heads: int = 2, head_dim: int = 64,
                    device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                    attend: Callable | None = None) -> tuple[dict[str, Callable[[], torch.Tensor]], float]:
    """The three kernels of the module docstring on random q, k, v of one shape, ready to
    call under no_grad, and the steady build time of the window's block mask in seconds.
    `attend`: the compiled dispatcher to share between shapes (default: a new one)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seq, head_dim, generator=g).to(device, dtype)
    k, v = (torch.randn(batch, kv_heads, seq, head_dim, generator=g).to(device, dtype) for _ in range(2))
    window_spec, causal = MaskSpec(True, window), MaskSpec(True)

    for _ in range(2):  # the second build is the steady cost (the first warms torch's vmap up)
        start = time.perf_counter()
        block_masks = BlockMasks().for_forward([window_spec], batch, seq, seq, device, None, None, None)
        synchronize(device)
        build_s = time.perf_counter() - start
    flex_pos, plain_pos = PositionInputs(block_masks=block_masks), PositionInputs()
    attend = attend or torch.compile(scaled_dot_product, fullgraph=True)
    steps = {
        "flex window": lambda: attend(q, k, v, flex_pos, window_spec, None),
        "sdpa causal": lambda: attend(q, k, v, plain_pos, causal, None),
        "sdpa window (dense)": lambda: attend(q, k, v, plain_pos, window_spec, None),
    }
    return steps, build_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    steps, build_s = attention_steps(args.seq, args.window, args.batch, args.heads, args.kv_heads, args.head_dim,
                                     device, dtype)
    with torch.no_grad():
        flex_out = steps["flex window"]()
        dense_out = steps["sdpa window (dense)"]()
        difference = (flex_out.float() - dense_out.float()).abs().max().item()
        start = time.perf_counter()
        times = round_robin(steps, args.repeats, device)
    wall = time.perf_counter() - start
    medians = {name: statistics.median(t) for name, t in times.items()}

    print(f"## Sliding-window attention, inference: batch {args.batch}, {args.seq} tokens, window {args.window}, "
          f"{args.heads} query / {args.kv_heads} KV heads x {args.head_dim}, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| kernel | median ms | min ms | max ms | vs sdpa causal |")
    print("|---|---:|---:|---:|---:|")
    base = medians["sdpa causal"]
    for name, t in times.items():
        print(f"| {name} | {medians[name] * 1e3:.2f} | {min(t) * 1e3:.2f} | {max(t) * 1e3:.2f} | "
              f"{base / medians[name]:.2f}x |")
    print(f"\nspeedup of flex window over full causal SDPA: {base / medians['flex window']:.2f}x "
          f"(medians of {args.repeats} alternating calls each, {wall:.1f} s of timing).")
    print(f"Block mask built once per shape in {build_s * 1e3:.1f} ms (not timed above); "
          f"flex and dense-window outputs differ by at most {difference:.2e}.")


if __name__ == "__main__":
    main()
