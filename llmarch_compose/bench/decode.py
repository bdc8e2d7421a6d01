"""The inference half measured: prefill, decoding at batch 1 and 8, the KV cache allocated,
and per-token decode time as the context grows, ours (eager and compiled) beside
transformers' `generate` on the same weights (its default dynamic cache, and its static
cache compiled). Every figure is a median over alternating runs in one process.

Per-token time at long contexts is measured on a state filled to that context directly
(slots marked written, values random): a decode step's cost depends on how many keys it
reads, not on what they hold, and filling 8K tokens by prefill would dominate the run.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..inference.generate import _Stepper, generate
from ..model.cache import DecodeState
from ..model.card import kv_cache
from .harness import round_robin, synchronize
from .products import matrix_products, prefill_products


@dataclass
class DecodeOptions:
    prompt_len: int = 64
    new_tokens: int = 128
    batch_sizes: tuple[int, ...] = (1, 8)
    prefill_batch: int = 8
    prefill_len: int = 256
    contexts: tuple[int, ...] = (512, 2048, 8192)
    steps: int = 3  # timed repetitions (medians)
    context_steps: int = 16  # decode steps timed per context
    hf: bool = True
    hf_static: bool = True  # also transformers' static cache, compiled (slow to compile on CPU)
    notes: list[str] = field(default_factory=list)


#: The prefill's reference: its matrix products alone, timed among the variants.
MATMUL = "matrix products alone"


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes per second of a large tensor copy (read + write), the bound a decode step's
    weight reads approach."""
    src = torch.empty(megabytes * 2 ** 20 // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / min(times)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def fill_to(state: DecodeState, context: int) -> None:
    """Mark `state`'s self-attention buffers written up to step `context` (random contents)."""
    for buffer in state.buffers():
        held = min(context, buffer.capacity)
        steps = torch.arange(context - held, context, device=buffer.steps.device)
        slots = steps % buffer.capacity if buffer.rolling else steps
        buffer.steps.index_copy_(0, slots, steps)
        for t in buffer.tensors.values():
            t.normal_()
    state.step.fill_(context)


def per_token_at(model: nn.Module, context: int, steps: int, compiled: bool, device: torch.device) -> float:
    """Median seconds of one batch-1 decode step with `context` tokens already cached."""
    step = _Stepper(model, compiled)  # its own graphs: one per context, apart from generate's
    state = model.new_decode_state(1, context + steps + 1)
    fill_to(state, context)
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    step(token, state)  # warm-up (and the compile)
    times = [_timed(lambda: step(token, state), device) for _ in range(steps)]
    return _median(times)


def hf_generate_fn(hf: nn.Module, ids: torch.Tensor, new: int, static: bool) -> Callable[[], torch.Tensor]:
    """transformers' `generate`, greedy, exactly `new` tokens. `static`: its static cache
    with its own automatic compilation of the decoding step (`CompileConfig`: fullgraph,
    static shapes; CUDA graphs on CUDA, as transformers does by default; on the CPU,
    where transformers compiles only when asked, plain Inductor)."""
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        from transformers import CompileConfig

        config = CompileConfig(fullgraph=True, dynamic=False,
                               mode="reduce-overhead" if ids.device.type == "cuda" else "default")
        config._compile_all_devices = True  # transformers compiles on accelerators only unless told
        kwargs.update(cache_implementation="static", compile_config=config)
    return lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


#: The seed's claims about the KV cache, each a configuration on the benchmark's width and
#: depth with 32 query heads (the seed's GQA example: 32 query heads share 4 KV heads).
KV_CLAIMS = (
    ("mha", ["attention=mha"]),
    ("mqa", ["attention=mqa"]),
    ("gqa, 4 KV heads", ["attention=gqa", "model.n_kv_heads=4"]),
    ("mla (latent + rotary key)", ["attention=mla"]),
    ("swa, 256-token window", ["attention=swa", "model.n_kv_heads=4", "model.window=256"]),
)


def kv_cache_claims(d_model: int, n_layers: int, lengths: tuple[int, ...] = (512, 2048, 8192)) -> list[dict]:
    """Bytes of the decoding buffers each KV_CLAIMS variant allocates at each length
    (built on meta: the buffers' shapes, no memory), and each one's ratio to MHA's."""
    from ..config.compose import compose
    from ..model.build import build

    base = [f"model.d_model={d_model}", f"model.n_layers={n_layers}", "model.n_heads=32",
            f"model.head_dim={max(8, d_model // 32)}", f"model.max_seq_len={max(lengths)}"]
    rows = []
    for label, extra in KV_CLAIMS:
        model = build(compose([*base, *extra]), device="meta")
        rows.append({"attention": label, "bytes": {n: model.new_decode_state(1, n).nbytes for n in lengths}})
    mha = rows[0]["bytes"]
    for row in rows:
        row["vs_mha"] = {n: row["bytes"][n] / mha[n] for n in lengths}
    return rows


def run_decode_benchmark(model: nn.Module, hf: Optional[nn.Module], options: DecodeOptions,
                         device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The measurements of the module docstring, as one report dict."""
    spec = model.spec.model
    vocab = spec.vocab_size
    g = torch.Generator(device="cpu").manual_seed(0)
    report: dict[str, Any] = {"model": spec.name, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                              "threads": torch.get_num_threads(), "notes": list(options.notes)}

    # Prefill: the inference forward of batch x length (last logits), against its matrix products.
    ids = torch.randint(0, vocab, (options.prefill_batch, options.prefill_len), generator=g).to(device)
    tokens = ids.numel()

    def ours_prefill(compiled: bool) -> Callable[[], None]:
        step = _Stepper(model, compiled)

        def run():
            state = model.new_decode_state(ids.shape[0], ids.shape[1])
            step(ids, state)
        return run

    # The reference alternates with the variants and each ratio is the median of one round's
    # ratios, so a change in the machine's load between rounds does not enter it.
    products = prefill_products(model, options.prefill_batch, options.prefill_len)
    prefill = {"ours eager": ours_prefill(False), "ours compiled": ours_prefill(True)}
    if products is not None:
        prefill[MATMUL] = matrix_products(products, device, dtype)
    if hf is not None:
        prefill["transformers eager"] = lambda: hf(input_ids=ids, use_cache=False, logits_to_keep=1)
    with torch.no_grad():
        seconds = round_robin(prefill, warmup=1, timed=options.steps, device=device)
    reference = seconds.pop(MATMUL, None)
    report["prefill"] = {
        "batch": options.prefill_batch, "length": options.prefill_len,
        "matmul_s": _median(reference) if reference else None,
        "variants": {name: {"s": _median(s), "tokens_per_s": tokens / _median(s),
                            "vs_matmul": _median([a / b for a, b in zip(s, reference)]) if reference else None}
                     for name, s in seconds.items()}}

    # Decoding: prompt + new tokens through generate, at each batch size.
    report["decode"] = []
    for batch in options.batch_sizes:
        prompt = torch.randint(0, vocab, (batch, options.prompt_len), generator=g).to(device)
        runs: dict[str, Callable[[], Any]] = {
            "ours eager": lambda p=prompt: generate(model, p, options.new_tokens),
            "ours compiled": lambda p=prompt: generate(model, p, options.new_tokens, compile=True),
        }
        if hf is not None:
            runs["transformers (dynamic cache)"] = hf_generate_fn(hf, prompt, options.new_tokens, static=False)
            if options.hf_static:
                runs["transformers (static cache, compiled)"] = hf_generate_fn(hf, prompt, options.new_tokens,
                                                                                static=True)
        with torch.no_grad():
            seconds = round_robin(runs, warmup=1, timed=options.steps, device=device)
        new = batch * options.new_tokens
        row = {"batch": batch, "prompt": options.prompt_len, "new_tokens": options.new_tokens,
               "variants": {name: {"s": _median(s), "tokens_per_s": new / _median(s)} for name, s in seconds.items()}}
        report["decode"].append(row)

    # The KV cache allocated, against the card's figure at the same length.
    length = options.prompt_len + options.new_tokens
    state = model.new_decode_state(1, length)
    card = kv_cache(model, torch.tensor([], dtype=dtype).element_size(), length)
    report["kv_cache"] = {"length": length, "allocated_bytes": state.nbytes,
                          "card_bytes": card["kv_cache_bytes_full_context"],
                          "per_token_bytes": card["kv_cache_bytes_per_token"]}
    report["kv_claims"] = kv_cache_claims(spec.d_model, spec.n_layers)

    # Per-token decode time as the context grows.
    with torch.no_grad():
        report["contexts"] = [
            {"context": c, "eager_s": per_token_at(model, c, options.context_steps, False, device),
             "compiled_s": per_token_at(model, c, options.context_steps, True, device)}
            for c in options.contexts]

    # The memory-bandwidth bound: every weight read once per decoded token (batch 1).
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bandwidth = copy_bandwidth(device)
    bound = weight_bytes / bandwidth
    best = max(v["tokens_per_s"] for v in report["decode"][0]["variants"].values() if v)
    ours = report["decode"][0]["variants"]["ours compiled"]["tokens_per_s"]
    report["bandwidth"] = {"weight_bytes": weight_bytes, "copy_bytes_per_s": bandwidth, "bound_s_per_token": bound,
                           "bound_tokens_per_s": 1 / bound, "ours_fraction_of_bound": ours * bound,
                           "best_tokens_per_s": best}
    return report


def _f(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_decode_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Inference benchmark: {report['model']}", "",
             f"{report['device']}, {report['dtype']}, {report['threads']} threads; medians.", ""]
    p = report["prefill"]
    lines += [f"## Prefill ({p['batch']} x {p['length']} tokens)", "",
              "Matrix products alone (torch.mm / torch.bmm, same shapes, timed among the variants): "
              + (f"{p['matmul_s'] * 1e3:.1f} ms." if p["matmul_s"] is not None else
                 "not measured (some of the model's products are not plain linears and attention)."), "",
              "| variant | ms | tokens/s | time / matmul |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {v['s'] * 1e3:.1f} | {v['tokens_per_s']:.0f} | {_f(v['vs_matmul'], '.2f')} |"
              for n, v in p["variants"].items()]
    for row in report["decode"]:
        lines += ["", f"## Decode, batch {row['batch']} ({row['prompt']}-token prompt, {row['new_tokens']} new)", "",
                  "| variant | s | new tokens/s |", "|---|---:|---:|"]
        lines += [f"| {n} | {v['s']:.2f} | {v['tokens_per_s']:.1f} |" for n, v in row["variants"].items()]
    kv = report["kv_cache"]
    lines += ["", "## KV cache", "",
              f"At {kv['length']} tokens: {kv['allocated_bytes']} bytes allocated, the card's figure "
              f"{kv['card_bytes']} ({kv['per_token_bytes']} bytes per token).", ""]
    claims = report.get("kv_claims") or []
    if claims:
        lengths = list(claims[0]["bytes"])
        lines += ["The seed's claims, as the buffers built for each attention with 32 query heads "
                  f"({report['model']}'s width and depth), batch 1:", "",
                  "| attention | " + " | ".join(f"bytes at {n}" for n in lengths) + f" | vs mha at {lengths[-1]} |",
                  "|---|" + "---:|" * (len(lengths) + 1)]
        lines += [f"| {c['attention']} | " + " | ".join(f"{c['bytes'][n]:,}" for n in lengths)
                  + f" | {c['vs_mha'][lengths[-1]]:.4g} |" for c in claims]
        lines += [""]
    lines += ["## Per-token decode time by context (batch 1)", "", "| context | eager ms | compiled ms |",
              "|---:|---:|---:|"]
    lines += [f"| {c['context']} | {c['eager_s'] * 1e3:.2f} | {c['compiled_s'] * 1e3:.2f} |" for c in report["contexts"]]
    b = report["bandwidth"]
    lines += ["", "## Memory-bandwidth bound", "",
              f"{b['weight_bytes'] / 2 ** 20:.1f} MiB of weights per token over a measured copy bandwidth of "
              f"{b['copy_bytes_per_s'] / 1e9:.1f} GB/s: at most {b['bound_tokens_per_s']:.0f} tokens/s at batch 1; "
              f"ours compiled reaches {b['ours_fraction_of_bound']:.0%} of it."]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out_dir: Path) -> None:
    import json

    from ..artifacts.atomic import write_atomic

    write_atomic(out_dir / "bench_decode.json", json.dumps(report, indent=2) + "\n")
    write_atomic(out_dir / "bench_decode.md", render_decode_markdown(report))
