"""`task=generate`: continue a prompt with a model, streaming the text to stdout as it is
produced; the model is a checkpoint of ours (`task.checkpoint`), a Hugging Face folder
(`model=hf model.path=...`) or any composed config (random weights, for timing).

    llmarch task=generate task.checkpoint=outputs/.../checkpoint task.prompt="def main():" task.max_new_tokens=200

Byte-level models read and write UTF-8 bytes; a model trained with `data.tokenizer`
uses the tokenizer saved with its checkpoint (see llmarch_compose/inference/loading.py).
Decoding stops at the model's end-of-sequence token (`model.eos_token_id`) unless
`task.stop_at_eos=false`. The decode step is compiled unless `compile=eager`. Every
setting is checked before any weight is read; the record of the run (prompt, text,
token ids, tokens/s) is written to generation.json in the output folder.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from ..artifacts.atomic import write_atomic
from ..config.structured import to_dataclass
from ..errors import ConfigError
from ..inference.loading import run_settings, check_ids, load_model, plan_model, text_codec
from ..inference.sampling import check_sampling
from ..plugin.objectives import MASKED_LM, SEQ2SEQ
from ..plugin.registry import register
from ..train.loop import to_json
from .train import output_dir

RECORD = "generation.json"


@dataclass
class GenerateTask:
    name: str = "generate"
    prompt: Optional[str] = None  # the text to continue (required)
    max_new_tokens: int = 100
    do_sample: bool = False  # false: greedy
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None  # the sampling seed; None: the run's `seed`
    checkpoint: Optional[str] = None  # one of our checkpoint folders; None: model=hf model.path=..., or random weights
    stop_at_eos: bool = True  # stop at the model's end-of-sequence token (model.eos_token_id)
    output: Optional[str] = None  # the folder for generation.json; None: Hydra's run directory (or the working directory)


def _shown(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def check_settings(task: GenerateTask) -> None:
    """The task's own values, before anything is loaded."""
    if task.prompt is None or not str(task.prompt):
        raise ConfigError("task.prompt", task.prompt, "name the text to continue", 'a non-empty text, e.g. '
                          'task.prompt="def main():"')
    if isinstance(task.max_new_tokens, bool) or task.max_new_tokens < 1:
        raise ConfigError("task.max_new_tokens", task.max_new_tokens, "counts the tokens to generate",
                          "an integer >= 1")
    try:
        check_sampling(task.temperature, task.top_k, task.top_p)
    except ConfigError as exc:
        raise ConfigError(f"task.{exc.key}", exc.value, exc.problem, exc.valid) from None


def check_lengths(prompt_ids: list[int], task: GenerateTask, max_seq_len: Optional[int], seq2seq: bool) -> None:
    """The prompt and what it grows to must fit the model's context (`model.max_seq_len`)."""
    if not prompt_ids:
        raise ConfigError("task.prompt", _shown(task.prompt), "encodes to no tokens", "a prompt with some text")
    if max_seq_len is None:
        return
    if len(prompt_ids) > max_seq_len:
        raise ConfigError("task.prompt", f"{_shown(task.prompt)} ({len(prompt_ids)} tokens)",
                          f"is longer than model.max_seq_len={max_seq_len}", f"a prompt of at most {max_seq_len} tokens")
    decoded = 1 if seq2seq else len(prompt_ids)  # an encoder-decoder decodes from its start token
    if decoded + task.max_new_tokens > max_seq_len:
        before = "the start token" if seq2seq else f"the {decoded}-token prompt"
        raise ConfigError("task.max_new_tokens", task.max_new_tokens,
                          f"{before} plus {task.max_new_tokens} new tokens pass model.max_seq_len={max_seq_len}",
                          f"an integer in 1..{max_seq_len - decoded}" if max_seq_len > decoded
                          else "a shorter prompt: it fills the context already")


class _Clock:
    """When each step's token arrived, for time to first token and decode tokens/s."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []

    def tick(self) -> None:
        self.arrivals.append(time.perf_counter())

    def figures(self) -> dict[str, Optional[float]]:
        n = len(self.arrivals)
        if not n:
            return {"time_to_first_token_s": None, "wall_s": time.perf_counter() - self.start,
                    "tokens_per_s": None, "decode_tokens_per_s": None}
        wall = self.arrivals[-1] - self.start
        # From the second token on: the first decode step compiles its graph (compile=default),
        # the later ones are the decode step's time alone.
        decode = self.arrivals[-1] - self.arrivals[1] if n > 2 else 0.0
        return {"time_to_first_token_s": self.arrivals[0] - self.start, "wall_s": wall,
                "tokens_per_s": n / wall if wall > 0 else None,
                "decode_tokens_per_s": (n - 2) / decode if decode > 0 else None}


@register("task", "generate", params=GenerateTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    from ..inference.generate import generate

    task: GenerateTask = to_dataclass(GenerateTask, cfg.task, "task")
    check_settings(task)
    compile_cfg, precision, device = run_settings(cfg)
    if compile_cfg.mode not in ("eager", "default"):  # generate compiles its decode step one way only
        raise ConfigError("compile", compile_cfg.name, "decoding is compiled whole, in the default mode (CUDA graphs "
                          "on CUDA); other modes are not applied to it", ["eager", "default"])
    plan = plan_model(cfg, task.checkpoint)
    objective = plan.objective
    if objective is MASKED_LM:
        raise ConfigError("topology", plan.topology, "an encoder-only model does not write left to right; its "
                          "inference is filling masks", "llmarch_compose.fill_mask(model, input_ids, mask_token_id) "
                          "from Python, or a model with a decoder")
    seq2seq = objective is SEQ2SEQ
    codec = text_codec(plan)
    numbers = plan.spec.model
    prompt_ids = codec.encode(task.prompt)
    check_lengths(prompt_ids, task, numbers.max_seq_len, seq2seq)
    check_ids("task.prompt", prompt_ids, numbers.vocab_size, _shown(task.prompt))
    seed = task.seed if task.seed is not None else cfg.seed

    model = load_model(plan, device, precision.dtype, cfg.seed)
    streamer = codec.streamer([] if seq2seq else prompt_ids)
    clock = _Clock()
    pieces: list[str] = []

    eos = numbers.eos_token_id if task.stop_at_eos else None
    eos_ids = set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(v) for v in eos}

    def on_token(token: torch.Tensor) -> None:
        clock.tick()
        if int(token[0]) in eos_ids:  # the end, not text
            return
        piece = streamer.push([int(token[0])])
        if piece:
            pieces.append(piece)
            print(piece, end="", flush=True)

    print(task.prompt if not seq2seq else "", end="", flush=True)
    with precision.autocast(device):
        out = generate(model, torch.tensor([prompt_ids], dtype=torch.long, device=device), task.max_new_tokens,
                       do_sample=task.do_sample, temperature=task.temperature, top_k=task.top_k,
                       top_p=task.top_p, eos_token_id=sorted(eos_ids), seed=seed,
                       compile=compile_cfg.mode != "eager", on_token=on_token)
    rest = streamer.finish()
    pieces.append(rest)
    print(rest, flush=True)
    new_ids = out[0, (1 if seq2seq else len(prompt_ids)):].tolist()
    stopped = bool(eos_ids) and bool(new_ids) and new_ids[-1] in eos_ids
    figures = clock.figures()
    record = {
        "model": plan.describe(), "source": plan.origin, "checkpoint": str(plan.folder) if plan.folder else None,
        "text_codec": codec.name, "prompt": task.prompt, "output": "".join(pieces),
        "prompt_tokens": len(prompt_ids), "new_tokens": len(new_ids), "tokens": new_ids,
        "stopped_at_eos": stopped, **figures, "compile": compile_cfg.mode, "precision": precision.name,
        "device": str(device), "settings": {k: v for k, v in asdict(task).items() if k not in ("name", "output")},
        "seed": seed,
    }
    out_dir = output_dir(task)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / RECORD, to_json(record, indent=2) + "\n")
    rate = figures["decode_tokens_per_s"]
    print(f"{len(new_ids)} tokens" + (f", {rate:,.1f} tokens/s decoding" if rate else "")
          + f" (first after {figures['time_to_first_token_s'] or 0:.2f} s); record in {out_dir / RECORD}",
          file=sys.stderr)
    return record


__all__ = ["GenerateTask", "run", "RECORD"]
