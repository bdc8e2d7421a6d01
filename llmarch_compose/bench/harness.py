"""How fast a composed model trains and runs, measured against peers on the same weights.

The mechanism behind `task=bench`:
- variants: our model eager, our model compiled (regional, fullgraph) and, when
  transformers is installed and the architecture has a Hugging Face mapping, the
  transformers model loaded from `to_hf`'s folder with SDPA attention (its
  logits are checked against ours before anything is timed);
- timing: the variants alternate step by step (round robin, the order rotating
  each round) so machine noise hits them alike; warm-up steps are not timed and
  the median is reported;
- memory of one training step: the variant's resident tensors (weights, buffers,
  AdamW state) plus the step's peak allocation above them: `max_memory_allocated`
  on CUDA, the running sum of the torch profiler's allocation events on CPU
  (tensor memory only, like the CUDA counter; no allocator or interpreter overhead);
- cold compile time: a child process with an empty inductor cache compiles and
  runs one training step; the compile time is that step minus a steady step;
- the machine's dense matmul rate (2048-cube, in the compute dtype), timed in the
  same rounds as the training steps, as the yardstick for the model's FLOP rate.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..model.build import build, resolve_device
from ..model.compiler import compile_from_config, compile_loss
from ..errors import LlmarchError
from ..interop.hf import to_hf
from ..plugin.interfaces import ModelOutput
from ..plugin.objectives import Objective, full_cross_entropy
from ..model.card import count_params, forward_flops_per_token
from ..model.precision import DTYPES, PrecisionConfig
from ..model.compiler import CompileConfig
from ..config.spec import resolve_spec
from ..config.structured import to_dataclass
from ..train import recompute
from ..train.chunked_loss import deferred_head
from .products import matrix_products, training_products

MATMUL_SIZE = 2048
#: How long the cold-compile probe may take before it counts as hung.
COLD_COMPILE_TIMEOUT_S = 1800
# Largest logits difference (relative to the logits' scale) at which two
# implementations count as the same model: far above rounding, far below a bug.
LOGITS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}


#: The training rounds' reference: the step's matrix products alone (products.py).
PRODUCTS = "step's matrix products"

# AdamW implementations: one fused kernel, multi-tensor (foreach) ops, or a loop of
# per-parameter ops (the CPU default of torch.optim.AdamW).
ADAMW = {"fused": dict(fused=True), "foreach": dict(foreach=True), "for_loop": dict(foreach=False)}


@dataclass
class Variant:
    """One implementation under test: a forward that returns ModelOutput and its optimizer."""

    name: str
    module: nn.Module  # owns the parameters
    forward: Callable[[torch.Tensor], ModelOutput]
    adamw: str = "fused"
    loss_chunk_tokens: int = 0  # the chunked LM head and loss (train/chunked_loss.py); 0: whole logits
    cross_entropy: Optional[Callable] = None  # the whole-logits loss (compiled with the model); None: eager
    optimizer: torch.optim.Optimizer = field(init=False)

    def __post_init__(self) -> None:
        self.optimizer = torch.optim.AdamW(self.module.parameters(), lr=1e-4, **ADAMW[self.adamw])


@dataclass
class Workload:
    """What one step does: the batch, the objective and the precision."""

    x: torch.Tensor
    y: torch.Tensor
    objective: Objective
    vocab_size: int
    precision: PrecisionConfig
    device: torch.device

    def train_step(self, variant: Variant) -> None:
        """Forward, loss (cross-entropy in fp32), backward, AdamW step; gradients
        are dropped last, so a step starts and ends with only the resident tensors."""
        generator = torch.Generator().manual_seed(0)  # masked objectives: the same masks every step
        with self.precision.autocast(self.device), deferred_head(variant.module, variant.loss_chunk_tokens) as ce:
            loss, _ = self.objective.loss(variant.forward, self.x, self.y, self.vocab_size, generator,
                                          ce or variant.cross_entropy)
            loss.backward()
        variant.optimizer.step()
        variant.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer(self, variant: Variant) -> None:
        with self.precision.autocast(self.device):
            variant.forward(self.x)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[str, Callable[[], None]], warmup: int, timed: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds of each timed call; the callables alternate, starting one later each round."""
    names = list(steps)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + timed):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            if round_ >= warmup:
                seconds[name].append(time.perf_counter() - start)
    return seconds


def matmul_step(dtype: torch.dtype, device: torch.device) -> tuple[Callable[[], None], float]:
    """A 2048-cube matmul and its FLOPs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(MATMUL_SIZE, MATMUL_SIZE, generator=g).to(device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), 2.0 * MATMUL_SIZE ** 3


# ------------------------------------------------------------------ memory

def resident_bytes(variant: Variant) -> int:
    """Weights, buffers and optimizer state, each tensor once."""
    tensors = {id(t): t for t in [*variant.module.parameters(), *variant.module.buffers()]}
    for state in variant.optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def step_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """The most tensor memory a call holds at once above what was live before it."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "resident tensors + peak of torch.cuda.max_memory_allocated during the step"
    return "resident tensors + peak of live CPU tensor bytes during the step (torch profiler allocation events)"


# ------------------------------------------------------------------ peers

def hf_peer(model: nn.Module, cfg: DictConfig, workdir: Path, dtype: torch.dtype,
            device: torch.device) -> tuple[Optional[nn.Module], str]:
    """The transformers model with our weights (SDPA attention), or None and why not."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed"
    if not model.objective.causal:
        return None, "not a causal LM: no AutoModelForCausalLM peer"
    try:
        folder = to_hf(model, cfg, workdir / "hf")
    except LlmarchError as exc:
        return None, f"no Hugging Face mapping: {exc}"
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", dtype=dtype)
    return hf.to(device).train(), "transformers " + transformers.__version__ + ", SDPA attention"


def hf_forward(hf: nn.Module) -> Callable[[torch.Tensor], ModelOutput]:
    return lambda ids: ModelOutput(hf(input_ids=ids, use_cache=False).logits, None)


def litgpt_status() -> str:
    if importlib.util.find_spec("litgpt") is None:
        return "litgpt is not installed"
    return "litgpt is installed, but this project has no weight mapping to it"


@torch.no_grad()
def logits_difference(a: Callable, b: Callable, x: torch.Tensor, precision: PrecisionConfig,
                      device: torch.device) -> tuple[float, float]:
    """Largest absolute logits difference, and the largest logit (its scale)."""
    with precision.autocast(device):
        la, lb = a(x).logits.float(), b(x).logits.float()
    return (la - lb).abs().max().item(), la.abs().max().item()


# ------------------------------------------------------------------ cold compile in a child process

def cold_compile(cfg: DictConfig, depth: Optional[int], batch_size: int, seq_len: int,
                 threads: Optional[int], adamw: str) -> dict[str, Any]:
    """Compile time with an empty inductor cache, in a fresh process, at `depth` layers
    (None: the config's). A small batch keeps the steps cheap; compile time does not
    depend on the batch."""
    request = {"config": OmegaConf.to_yaml(cfg), "depth": depth, "batch_size": batch_size, "seq_len": seq_len,
               "threads": threads, "adamw": adamw}
    with tempfile.TemporaryDirectory(prefix="llmarch-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        done = subprocess.run([sys.executable, "-m", "llmarch_compose.bench.harness"], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=COLD_COMPILE_TIMEOUT_S)
    if done.returncode:
        raise RuntimeError(f"the cold-compile probe failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def config_at_depth(cfg: DictConfig, depth: Optional[int]) -> DictConfig:
    """`cfg` with `depth` layers (None: as it is); a scale caps the preset's depth, so both are set."""
    if depth is None:
        return cfg
    cfg = cfg.copy()
    cfg.model.n_layers = depth
    if "scale" in cfg:
        cfg.scale.n_layers = depth
    return cfg


def _cold_compile_child(request: dict[str, Any]) -> dict[str, Any]:
    if request["threads"]:
        torch.set_num_threads(request["threads"])
    cfg = config_at_depth(OmegaConf.create(request["config"]), request["depth"])
    spec = resolve_spec(cfg)
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    device = resolve_device_of(cfg)
    torch.manual_seed(0)
    model = build(spec, device=device, dtype=precision.dtype)
    compiled = compile_from_config(model, compiled_settings(cfg))
    workload = make_workload(model, spec.model.vocab_size, request["batch_size"], request["seq_len"],
                             precision, device)
    variant = Variant("compiled", model, compiled, request["adamw"], cross_entropy=compiled_loss(cfg))
    seconds = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        workload.train_step(variant)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    steady = statistics.median(seconds[1:])
    return {"n_layers": spec.model.n_layers, "first_step_s": seconds[0], "steady_step_s": steady,
            "compile_s": seconds[0] - steady}


# ------------------------------------------------------------------ shared setup

def resolve_device_of(cfg: DictConfig) -> torch.device:
    return resolve_device(cfg.get("device", "auto"))


def compiled_loss(cfg: DictConfig) -> Callable:
    """The whole-logits loss compiled as the compiled variants' model is (as a training run does)."""
    return compile_loss(full_cross_entropy, compiled_settings(cfg))


def compiled_settings(cfg: DictConfig) -> CompileConfig:
    """The config's compile settings; `compile=eager` still gets a compiled variant (default mode)."""
    settings = to_dataclass(CompileConfig, cfg.compile, "compile")
    if settings.mode == "eager":
        settings.mode = "default"
    return settings


def make_workload(model: nn.Module, vocab_size: int, batch_size: int, seq_len: int, precision: PrecisionConfig,
                  device: torch.device) -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g).to(device)
    return Workload(x[:, :-1], x[:, 1:], model.objective, vocab_size, precision, device)


# ------------------------------------------------------------------ the benchmark

@dataclass
class BenchOptions:
    steps: int = 5
    warmup: int = 2
    batch_size: int = 8
    seq_len: int = 128
    variants: Sequence[str] = ("eager", "compiled", "hf")
    memory: bool = True
    cold_compile: bool = True
    compile_depths: Sequence[int] = ()
    threads: Optional[int] = None
    adamw: str = "fused"
    loss_chunk_tokens: int = 1024  # the memory-saving variants' chunk of the LM head and loss


#: eager and compiled as a training run does by default; `chunked`: compiled with the
#: chunked LM head and loss; `selective` and `recompute`: chunked, with selective or full
#: activation checkpointing.
VARIANTS = ("eager", "compiled", "chunked", "selective", "recompute", "hf")
MEMORY_VARIANTS = {"chunked": "none", "selective": "selective", "recompute": "full"}
DEFAULT_VARIANTS = ("eager", "compiled", "hf")


@dataclass
class Setup:
    """The model under test and what every variant shares: its batch, precision and costs."""

    spec: Any
    model: Optional[nn.Module]  # None once the variants hold their copies
    precision: PrecisionConfig
    device: torch.device
    compute_dtype: torch.dtype
    counts: dict[str, int]
    flops: dict[str, float]
    workload: Workload
    products: Optional[tuple[list, list]]  # the training step's matrix products, where every one is known


def prepare(cfg: DictConfig, options: BenchOptions) -> Setup:
    if options.threads:
        torch.set_num_threads(options.threads)
    spec = resolve_spec(cfg)
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    precision.validate()
    device = resolve_device_of(cfg)
    torch._dynamo.reset()  # graphs of earlier models must not count against the recompile limit
    torch.manual_seed(cfg.get("seed", 0))
    model = build(spec, device=device, dtype=precision.dtype)
    counts = count_params(model)
    workload = make_workload(model, spec.model.vocab_size, options.batch_size, options.seq_len, precision, device)
    compute_dtype = DTYPES[precision.autocast_dtype] if precision.autocast_dtype else precision.dtype
    return Setup(spec, model, precision, device, compute_dtype, counts,
                 forward_flops_per_token(model, counts, options.seq_len), workload,
                 training_products(model, options.batch_size, options.seq_len))


@dataclass
class Variants:
    """The implementations to time (in VARIANTS order), what was checked before timing them,
    and the compiled variant's first step (its compilation) in seconds."""

    variants: dict[str, Variant] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    first_compile_s: Optional[float] = None


def hf_variant(setup: Setup, cfg: DictConfig, options: BenchOptions, workdir: Path, out: Variants) -> None:
    """The transformers peer, timed only if its logits match ours."""
    hf, why = hf_peer(setup.model, cfg, workdir, setup.precision.dtype, setup.device)
    if hf is None:
        out.notes.append(f"Hugging Face peer: {why}")
        return
    diff, scale = logits_difference(setup.model, hf_forward(hf), setup.workload.x, setup.precision, setup.device)
    out.checks["hf_logits_max_abs_diff"] = diff
    out.checks["hf_logits_match"] = diff <= LOGITS_TOLERANCE[setup.compute_dtype] * max(1.0, scale)
    if out.checks["hf_logits_match"]:
        out.notes.append(f"Hugging Face peer: {why}; logits match ours (max |diff| {diff:.2e})")
        out.variants["hf"] = Variant("hf", hf, hf_forward(hf), options.adamw)
    else:
        out.notes.append(f"Hugging Face peer: logits differ from ours by {diff:.3g}: not compared")


def compiled_variant(setup: Setup, cfg: DictConfig, options: BenchOptions, out: Variants) -> None:
    """Ours compiled, checked against eager; its first training step is timed as the compilation."""
    compiled_model = copy.deepcopy(setup.model)
    compiled = compile_from_config(compiled_model, compiled_settings(cfg))
    out.variants["compiled"] = Variant("compiled", compiled_model, compiled, options.adamw,
                                       cross_entropy=compiled_loss(cfg))
    diff, scale = logits_difference(setup.model, compiled, setup.workload.x, setup.precision, setup.device)
    out.checks["compiled_logits_max_abs_diff"] = diff
    out.checks["compiled_logits_match"] = diff <= LOGITS_TOLERANCE[setup.compute_dtype] * max(1.0, scale)
    synchronize(setup.device)
    start = time.perf_counter()  # the first training step compiles forward and backward
    setup.workload.train_step(out.variants["compiled"])
    synchronize(setup.device)
    out.first_compile_s = time.perf_counter() - start


def make_variants(setup: Setup, cfg: DictConfig, options: BenchOptions, workdir: Path) -> Variants:
    out = Variants()
    if "hf" in options.variants:  # converted first: the other variants get copies of the same weights
        hf_variant(setup, cfg, options, workdir, out)
    out.notes.append(litgpt_status())
    if "eager" in options.variants:
        eager = copy.deepcopy(setup.model)
        out.variants["eager"] = Variant("eager", eager, eager, options.adamw)
    if "compiled" in options.variants:
        compiled_variant(setup, cfg, options, out)
    for name, recompute_mode in MEMORY_VARIANTS.items():
        if name in options.variants:
            model = copy.deepcopy(setup.model)
            forward = compile_from_config(model, compiled_settings(cfg))
            recompute.apply(model, recompute_mode)
            out.variants[name] = Variant(name, model, forward, options.adamw, options.loss_chunk_tokens,
                                         compiled_loss(cfg))
    out.variants = {name: out.variants[name] for name in VARIANTS if name in out.variants}
    return out


def measure(setup: Setup, variants: dict[str, Variant], options: BenchOptions
            ) -> tuple[dict[str, dict[str, Any]], float, Optional[float]]:
    """Each variant's step times, throughput, FLOP rate and memory, the matmul rate they are
    measured against, and the median time of the step's matrix products alone (None where
    the model has products the reference does not know)."""
    workload, device, tokens = setup.workload, setup.device, options.batch_size * options.seq_len
    matmul, matmul_flops = matmul_step(setup.compute_dtype, device)
    train_steps: dict[str, Callable[[], None]] = {n: (lambda v=v: workload.train_step(v)) for n, v in variants.items()}
    references = {"matmul": matmul}
    if setup.products is not None:  # the step's own matrix products alone: the limit on a CPU
        references[PRODUCTS] = matrix_products(setup.products, device, setup.compute_dtype)
    train_s = round_robin({**train_steps, **references}, options.warmup, options.steps, device)
    products_s = train_s.pop(PRODUCTS, None)
    infer_s = round_robin({n: (lambda v=v: workload.infer(v)) for n, v in variants.items()},
                          options.warmup, options.steps, device)
    matmul_rate = matmul_flops / statistics.median(train_s.pop("matmul"))
    per_token = setup.flops["flops_per_token"]
    results: dict[str, dict[str, Any]] = {}
    for name, variant in variants.items():
        train_median, infer_median = statistics.median(train_s[name]), statistics.median(infer_s[name])
        row = {
            "train_step_s": train_median, "train_tokens_per_s": tokens / train_median,
            "infer_step_s": infer_median, "infer_tokens_per_s": tokens / infer_median,
            "train_model_flops_per_s": 3 * per_token * tokens / train_median,
            "infer_model_flops_per_s": per_token * tokens / infer_median,
        }
        row["train_fraction_of_matmul"] = row["train_model_flops_per_s"] / matmul_rate
        if products_s is not None:  # the median of each round's ratio: load changes between rounds cancel
            row["train_vs_products"] = statistics.median(a / b for a, b in zip(train_s[name], products_s))
        row["infer_fraction_of_matmul"] = row["infer_model_flops_per_s"] / matmul_rate
        if options.memory:
            resident = resident_bytes(variant)
            row["train_peak_bytes"] = resident + step_peak_bytes(train_steps[name], device)
            row["resident_bytes"] = resident
        results[name] = row
    compare_with_hf(results, options.memory)
    return results, matmul_rate, statistics.median(products_s) if products_s is not None else None


def compare_with_hf(results: dict[str, dict[str, Any]], memory: bool) -> None:
    """Every variant's throughput and memory as a ratio to the transformers peer's, when it ran."""
    if "hf" not in results:
        return
    peer = results["hf"]
    for row in results.values():
        row["train_vs_hf"] = row["train_tokens_per_s"] / peer["train_tokens_per_s"]
        row["infer_vs_hf"] = row["infer_tokens_per_s"] / peer["infer_tokens_per_s"]
        if memory:
            row["memory_vs_hf"] = row["train_peak_bytes"] / peer["train_peak_bytes"]


def compile_times(cfg: DictConfig, options: BenchOptions, measured: Variants) -> dict[str, Any]:
    times: dict[str, Any] = {"first_step_in_process_s": measured.first_compile_s}
    if options.cold_compile and "compiled" in measured.variants:
        times["cold"] = cold_compile(cfg, None, 1, options.seq_len, options.threads, options.adamw)
        times["by_depth"] = [cold_compile(cfg, depth, 1, options.seq_len, options.threads, options.adamw)
                             for depth in options.compile_depths]
    return times


def run_benchmark(cfg: DictConfig, options: BenchOptions, workdir: Path) -> dict[str, Any]:
    """Every measurement as plain data (JSON-serializable). The goals a run is compared
    with belong to the benchmark scripts (benchmarks/), not here."""
    setup = prepare(cfg, options)
    measured = make_variants(setup, cfg, options, workdir)
    setup.model = None  # freed: the variants hold their own copies
    results, matmul_rate, products_s = measure(setup, measured.variants, options)
    flops_per_token = setup.flops["flops_per_token"]
    return {
        "model": setup.spec.model.name, "components": setup.spec.components, **setup.counts,
        "device": str(setup.device), "precision": setup.precision.name,
        "compute_dtype": str(setup.compute_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "batch_size": options.batch_size, "seq_len": options.seq_len,
        "tokens_per_step": options.batch_size * options.seq_len, "steps": options.steps, "warmup": options.warmup,
        "adamw": options.adamw, "flops_per_token_forward": flops_per_token, "flops_per_token_train": 3 * flops_per_token,
        "matmul": {"size": MATMUL_SIZE, "flops_per_s": matmul_rate},
        "step_products_s": products_s,
        "memory_method": memory_method(setup.device) if options.memory else None,
        "loss_chunk_tokens": options.loss_chunk_tokens,
        "variants": results, "checks": measured.checks, "compile": compile_times(cfg, options, measured),
        "notes": measured.notes,
    }


# ------------------------------------------------------------------ the report

def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Benchmark: {report['model']}",
        "",
        f"{report['params_total']:,} parameters; batch {report['batch_size']} x {report['seq_len']} tokens; "
        f"{report['precision']} ({report['compute_dtype']} compute) on {report['device']}, "
        f"{report['threads']} threads; AdamW {report['adamw']}; medians of {report['steps']} steps after {report['warmup']} warm-up, "
        "variants alternating step by step.",
        "",
        "| variant | train tokens/s | vs HF | inference tokens/s | vs HF | peak train memory | vs HF "
        "| train FLOP/s | of matmul rate |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    names = {"eager": "ours, eager", "compiled": "ours, compiled", "hf": "Hugging Face (SDPA)",
             "chunked": f"ours, compiled, loss in chunks of {report.get('loss_chunk_tokens')} tokens",
             "selective": "ours, compiled, chunked loss, activation checkpointing (selective)",
             "recompute": "ours, compiled, chunked loss, activation checkpointing (full)"}
    for name, row in report["variants"].items():
        peak = row.get("train_peak_bytes")
        lines.append(
            f"| {names[name]} | {row['train_tokens_per_s']:,.0f} | {_fmt(row.get('train_vs_hf'), '.2f')}x "
            f"| {row['infer_tokens_per_s']:,.0f} | {_fmt(row.get('infer_vs_hf'), '.2f')}x "
            f"| {_fmt(peak / 2**20 if peak is not None else None, ',.1f')} MiB "
            f"| {_fmt(row.get('memory_vs_hf'), '.2f')}x "
            f"| {row['train_model_flops_per_s'] / 1e9:,.1f} G | {row['train_fraction_of_matmul']:.0%} |")
    lines += ["", f"Matmul {report['matmul']['size']}-cube ({report['compute_dtype']}): "
                  f"{report['matmul']['flops_per_s'] / 1e9:,.1f} GFLOP/s, timed in the same rounds. "
                  f"Model FLOPs: 3 x {report['flops_per_token_forward'] / 1e6:,.1f} MFLOP per token "
                  "(2 per weight and token, plus attention scores, forward; backward twice that)."]
    if report.get("step_products_s") is not None:
        ratios = ", ".join(f"{names[n]} {row['train_vs_products']:.2f}x" for n, row in report["variants"].items())
        lines += ["", f"A training step over its own matrix products alone (every forward and backward product "
                      f"of the linears, the head and attention, timed with torch.mm / torch.bmm in the same "
                      f"rounds: {report['step_products_s'] * 1e3:,.0f} ms; the median of each round's ratio): "
                      f"{ratios}."]
    if report["memory_method"]:
        lines.append(f"Peak memory: {report['memory_method']}.")
    c = report["compile"]
    lines += ["", "Compile (regional, fullgraph):"]
    if c["first_step_in_process_s"] is None:
        lines.append("- no compiled variant measured")
    else:
        lines.append(f"- first training step in this process (inductor cache as found): "
                     f"{c['first_step_in_process_s']:.1f} s")
    if c.get("cold"):
        lines.append(f"- cold (empty inductor cache, fresh process): {c['cold']['compile_s']:.1f} s "
                     f"at {c['cold']['n_layers']} layers")
    for d in c.get("by_depth") or []:
        lines.append(f"- cold at {d['n_layers']} layers: {d['compile_s']:.1f} s")
    lines += ["", "Checks:"]
    lines += [f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in report["checks"].items()]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # the cold-compile probe: a request on stdin, one JSON line out
    print(json.dumps(_cold_compile_child(json.loads(sys.stdin.read()))))
