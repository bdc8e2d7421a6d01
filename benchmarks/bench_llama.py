"""The reference benchmark: a LLaMA-style model (512 wide, 8 layers, 8 query heads
sharing 2 KV heads, FFN 1408, vocabulary 8192), batch 8 x 256 tokens, fp32, two
threads; ours eager and compiled against Hugging Face transformers on the same
weights. Extra Hydra overrides on the command line are applied last:

    python benchmarks/bench_llama.py task.steps=10 task.output_dir=bench-out
"""

from __future__ import annotations

import sys

import llmarch_compose as lc
from llmarch_compose.tasks import run_task

SHAPE = ["model.name=llama-512x8", "model.d_model=512", "model.n_layers=8", "model.n_heads=8", "model.n_kv_heads=2", "model.ffn_dim=1408",
         "model.vocab_size=8192", "model.max_seq_len=256", "model.tie_embeddings=false"]
RUN = ["task=bench", "precision=fp32", "device=cpu", "task.batch_size=8", "task.seq_len=256", "task.threads=2",
       "task.compile_depths=[2,16]"]


def main(extra: list[str]) -> None:
    run_task(lc.compose([*SHAPE, *RUN, *extra]))


if __name__ == "__main__":
    main(sys.argv[1:])
