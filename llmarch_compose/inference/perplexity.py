"""Perplexity of a causal model on one token stream, at several context lengths.

At a context length L the stream is cut into non-overlapping windows: window i reads
tokens [i*L, i*L + L) and predicts each next token, tokens [i*L + 1, i*L + L], so every
token of the covered stretch is predicted once, from at most L - 1 tokens before it in
its window. At most `max_windows` windows are taken per length, from the start of the
stream (the same text at every length, longer lengths covering more of it). The figures
are the mean negative log-likelihood in nats per predicted token, its exponential (the
perplexity), and for byte-level models bits per byte (nats per token / ln 2); tokens/s
counts the batches after a length's first (which compiles its shape), where there are more.

A length is refused, as a row of the report with its reason, where the model has no
position for it (a learned absolute table shorter than L) or the stream is too short for
one window; lengths past the training length are evaluated wherever the positions allow
(RoPE, ALiBi, relative buckets, sinusoids): that is the extrapolation being measured.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F

OK, REFUSED = "ok", "refused"


@dataclass
class Length:
    """One context length's plan: how many windows, or why none."""

    length: int
    windows: int = 0
    reason: Optional[str] = None


def plan_lengths(lengths: Iterable[int], stream_tokens: int, max_windows: int,
                 max_positions: Optional[int]) -> list[Length]:
    plans = []
    for length in lengths:
        if max_positions is not None and length > max_positions:
            plans.append(Length(length, reason=f"the model's learned position table holds {max_positions} positions; "
                                                f"a window of {length} tokens has none past them"))
        elif stream_tokens < length + 1:
            plans.append(Length(length, reason=f"the text holds {stream_tokens} tokens; one window of {length} "
                                                f"needs {length + 1}"))
        else:
            plans.append(Length(length, windows=min(max_windows, (stream_tokens - 1) // length)))
    return plans


def windows(stream: torch.Tensor, length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `count` windows of `length`: inputs [count, length] and their next tokens."""
    starts = torch.arange(count) * length
    index = starts[:, None] + torch.arange(length + 1)[None, :]
    rows = stream[index].long()
    return rows[:, :-1], rows[:, 1:]


@torch.no_grad()
def window_nll(forward: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each row's summed negative log-likelihood of its targets, in float64: [rows]."""
    logits = forward(x).logits
    nll = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return nll.view(y.shape).double().sum(dim=1)


def evaluate_lengths(forward: Callable, stream: torch.Tensor, plans: list[Length], batch_size: int,
                     device: torch.device, byte_level: bool, static_batches: bool = False,
                     autocast: Optional[Callable[[], Any]] = None,
                     on_batch: Optional[Callable[[int, int], None]] = None
                     ) -> list[dict[str, Any]]:
    """One row per planned length. `static_batches`: a short last batch is filled up with
    repeats of its last window (whose figures are dropped), so a compiled model sees one
    shape per length."""
    rows = []
    for plan in plans:
        if plan.reason is not None:
            rows.append({"context_length": plan.length, "status": REFUSED, "reason": plan.reason})
            continue
        x_all, y_all = windows(stream, plan.length, plan.windows)
        total = torch.zeros((), dtype=torch.float64)
        start = time.perf_counter()
        timed_from, timed_tokens = start, 0  # throughput after the first batch, which compiles a new shape
        for first in range(0, plan.windows, batch_size):
            x, y = x_all[first:first + batch_size], y_all[first:first + batch_size]
            real = x.shape[0]
            if static_batches and real < batch_size:
                fill = batch_size - real
                x = torch.cat((x, x[-1:].expand(fill, -1)))
                y = torch.cat((y, y[-1:].expand(fill, -1)))
            with autocast() if autocast is not None else contextlib.nullcontext():
                nll = window_nll(forward, x.to(device), y.to(device))
            total += nll[:real].sum().cpu()
            if first == 0:
                timed_from = time.perf_counter()
            else:
                timed_tokens += real * plan.length
            if on_batch is not None:
                on_batch(plan.length, real)
        end = time.perf_counter()
        seconds = end - start
        tokens = plan.windows * plan.length
        if not timed_tokens:  # one batch: its time, compiling included
            timed_from, timed_tokens = start, tokens
        nats = float(total) / tokens
        rows.append({
            "context_length": plan.length, "status": OK, "windows": plan.windows, "tokens": tokens,
            "nats_per_token": nats, "perplexity": math.exp(nats) if nats < 700 else math.inf,
            "bits_per_byte": nats / math.log(2) if byte_level else None,
            "seconds": seconds, "tokens_per_s": timed_tokens / (end - timed_from) if end > timed_from else None,
        })
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    byte_level = report["byte_level"]
    lines = [f"# Perplexity of {report['model']}", "",
             f"Text: {report['text']}, {report['stream_tokens']:,} tokens ({report['text_codec']}). "
             f"Trained at {report['trained_seq_len']:,} tokens (model.max_seq_len={report['max_seq_len']:,}); "
             f"positions: {report['position']}.", "",
             "| context | windows | tokens | nats/token | perplexity |" + (" bits/byte |" if byte_level else "")
             + " tokens/s |",
             "|---:|---:|---:|---:|---:|" + ("---:|" if byte_level else "") + "---:|"]
    for row in report["rows"]:
        length = f"{row['context_length']:,}" + (" *" if row["context_length"] > report["trained_seq_len"] else "")
        if row["status"] != OK:
            lines.append(f"| {length} | refused: {row['reason']} |" + " |" * (5 if byte_level else 4))
            continue
        bpb = f" {row['bits_per_byte']:.4f} |" if byte_level else ""
        rate = f"{row['tokens_per_s']:,.0f}" if row["tokens_per_s"] else "-"
        lines.append(f"| {length} | {row['windows']} | {row['tokens']:,} | {row['nats_per_token']:.4f} | "
                     f"{row['perplexity']:.3f} |{bpb} {rate} |")
    past = any(row["context_length"] > report["trained_seq_len"] for row in report["rows"])
    lines += ["", ("\\* past the training length. " if past else "") + "Windows do not overlap; each token is "
              "predicted once, from the tokens before it in its window.", ""]
    return "\n".join(lines)


def plot_png(report: dict[str, Any]) -> Optional[bytes]:
    """Perplexity against context length (lengths in log scale), the training length marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no display needed

    done = [r for r in report["rows"] if r["status"] == OK and math.isfinite(r["perplexity"])]
    if not done:
        return None
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lengths = [r["context_length"] for r in done]
    values = [r["perplexity"] for r in done]
    ax.plot(lengths, values, marker="o", label=f"{report['position']} positions")
    ax.axvline(report["trained_seq_len"], color="grey", linestyle="--", linewidth=1,
               label=f"trained at {report['trained_seq_len']:,}")
    ax.set_xscale("log", base=2)
    if max(values) > 10 * min(values):  # a wide range (a model that breaks down past its length) in log scale
        ax.set_yscale("log")
    ax.set_xticks(lengths, [f"{n:,}" for n in lengths])
    refused = [r["context_length"] for r in report["rows"] if r["status"] != OK]
    note = f" (refused: {', '.join(str(n) for n in refused)})" if refused else ""
    ax.set(xlabel="context length (tokens)", ylabel="perplexity", title=f"{report['model']}{note}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


__all__ = ["Length", "plan_lengths", "windows", "window_nll", "evaluate_lengths", "render_markdown", "plot_png",
           "OK", "REFUSED"]
