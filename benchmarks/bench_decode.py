"""The inference benchmark on the reference LLaMA-style shape (512 wide, 8 layers, 8
query heads sharing 2 KV heads, FFN 1408, vocabulary 8192), fp32, two threads: prefill of
8 x 256 against its matrix products, decoding (64-token prompt, 128 new tokens) at batch
1 and 8 against transformers' `generate` (dynamic cache; static cache compiled), the KV
cache allocated, and per-token decode time at 512, 2K and 8K tokens of context for full
attention and for a 256-token sliding window. Extra overrides are applied last:

    python benchmarks/bench_decode.py task.steps=5 task.output=bench-decode
"""

from __future__ import annotations

import sys

import llmarch_compose as lc
from llmarch_compose.tasks import run_task

SHAPE = ["model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=1408",
         "model.vocab_size=8192", "model.max_seq_len=8448", "model.tie_embeddings=false"]
RUN = ["task=bench", "task.mode=decode", "precision=fp32", "device=cpu", "task.threads=2", "task.batch_size=8",
       "task.seq_len=256"]
WINDOW = ["attention=swa", "model.window=256", "task.decode_batch_sizes=[1]", "task.hf_static=false"]


def main(argv: list[str]) -> None:
    full = run_task(lc.compose([*SHAPE, "model.name=llama-512x8", *RUN, *argv]))
    window = run_task(lc.compose([*SHAPE, "model.name=llama-512x8-swa256", *RUN, *WINDOW, *argv]))
    print("\n# Per-token decode time, 8K context / 512 (compiled)")
    for name, report in (("full attention", full), ("256-token window", window)):
        by = {c["context"]: c["compiled_s"] for c in report["contexts"]}
        if 512 in by and 8192 in by:
            print(f"- {name}: {by[8192] / by[512]:.2f}x")
    decode = full["decode"][0]["variants"]
    ours = decode["ours compiled"]["tokens_per_s"]
    for peer in ("transformers (dynamic cache)", "transformers (static cache, compiled)"):
        if peer in decode:
            print(f"- batch 1 decode, ours compiled / {peer}: {ours / decode[peer]['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
