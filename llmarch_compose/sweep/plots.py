"""The sweep report's figures, rendered to PNG bytes (the report writes them).

One colour per configuration, the same in every figure; a configuration's seeds
share it. Where a configuration ran several seeds, curves are the mean over its
seeds with a band of one standard deviation either side, and bars the mean with
error bars of one standard deviation and a dot per seed. Value axes start near the
data, not at zero, so that differences of a percent are visible (the axis label
says so). Throughput measured under foreign CPU load is hatched and labelled.

Matplotlib runs on its Agg backend: no display is needed, and a sweep on a
server draws the same figures as one on a laptop.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from ..train.foreign_load import LOADED

LOSS_CURVES = "loss_curves.png"
FINAL_VAL_LOSS = "final_val_loss.png"
TOKENS_PER_S = "tokens_per_s.png"
TITLES = {LOSS_CURVES: "Train and held-out loss by step", FINAL_VAL_LOSS: "Final held-out loss",
          TOKENS_PER_S: "Training tokens/s"}


@dataclass
class Series:
    """One configuration as the plots draw it."""

    label: str
    train: list[list[tuple[int, float]]]  # per job: (step, train loss)
    val: list[list[tuple[int, float]]]  # per job: (step, held-out loss)
    figures: dict[str, list[float]] = field(default_factory=dict)  # summary field -> per job
    foreign_load: Optional[float] = None  # the highest foreign CPU load above the mark, if any


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure  # a Figure of its own needs no pyplot state or GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    mean = math.fsum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float, float]]:
    """(step, mean, sd) at the steps every non-empty curve has."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return []
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    return [(step, *_mean_sd([c[step] for c in curves])) for step in steps]


def _curves_panel(ax, runs: Sequence[Series], colours: Sequence, key: str, ylabel: str, grouped: bool) -> bool:
    drawn = False
    for run, colour in zip(runs, colours):
        curves = run.train if key == "train" else run.val
        points = mean_curve(curves)
        if not points:
            continue
        drawn = True
        steps, means, sds = zip(*points)
        seeds = sum(bool(c) for c in curves)
        label = f"{run.label} ({seeds} seeds)" if seeds > 1 else run.label
        ax.plot(steps, means, color=colour, marker="o" if len(points) < 20 else None, markersize=3, label=label)
        if seeds > 1:
            ax.fill_between(steps, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                            color=colour, alpha=0.2, linewidth=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="step", ylabel=ylabel + (" (mean; band: ±1 s.d. over seeds)" if grouped else ""))
    ax.grid(alpha=0.3)
    return drawn


def loss_curves(runs: Sequence[Series], grouped: bool):
    """Train loss (left) and held-out loss (right) by step, one colour per configuration
    (a Figure; None without a curve)."""
    if not any(any(r.train) or any(r.val) for r in runs):
        return None
    fig = _figure(width=11.0, height=4.5)
    left, right = fig.subplots(1, 2)
    colours = _colours(len(runs))
    _curves_panel(left, runs, colours, "train", "train loss", grouped)
    _curves_panel(right, runs, colours, "val", "held-out loss", grouped)
    left.set_title("Train loss")
    right.set_title("Held-out loss")
    handles, labels = right.get_legend_handles_labels()
    if not handles:
        handles, labels = left.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize="small")
    return fig


def bars(runs: Sequence[Series], key: str, xlabel: str, name: str, mark_load: bool = False):
    """Horizontal bars of `key`'s mean per configuration, with ±1 s.d. error bars and a dot per
    seed where several ran; the value axis spans the data, not zero (a Figure; None without data)."""
    colours = _colours(len(runs))
    rows = [(run, colour, run.figures.get(key) or []) for run, colour in zip(runs, colours)]
    rows = [(run, colour, values) for run, colour, values in rows if values]
    if not rows:
        return None
    fig = _figure(width=8.0, height=max(2.4, 0.55 * len(rows) + 1.5))
    ax = fig.add_subplot()
    lows, highs = [], []
    for position, (run, colour, values) in enumerate(rows):
        mean, sd = _mean_sd(values)
        hatch = "//" if mark_load and run.foreign_load is not None else None
        ax.barh(position, mean, color=colour, alpha=0.85, hatch=hatch, edgecolor="black" if hatch else colour,
                xerr=sd if len(values) > 1 else None, capsize=4, error_kw={"elinewidth": 1.2})
        if len(values) > 1:
            ax.plot(values, [position] * len(values), "o", color="black", markersize=3, zorder=3)
        text = f"{mean:.4g}" + (f" ± {sd:.2g}" if len(values) > 1 else "")
        ax.annotate(text, (max(mean + sd, *values), position), xytext=(4, 0), textcoords="offset points", va="center",
                    fontsize="small")
        lows += [mean - sd, *values]
        highs += [mean + sd, *values]
    low, high = min(lows), max(highs)
    span = (high - low) or abs(high) * 0.05 or 1.0
    ax.set_xlim(low - 0.15 * span, high + 0.45 * span)  # room on the right for the labels
    names = [run.label + (f"\nforeign CPU load {run.foreign_load:.0%}" if mark_load and run.foreign_load is not None
                          else "") for run, _, _ in rows]
    ax.set_yticks(range(len(rows)), names, fontsize="small")
    ax.invert_yaxis()  # table order, top to bottom
    spread = " (mean ± 1 s.d. over seeds; dots: seeds)" if any(len(v) > 1 for _, _, v in rows) else ""
    ax.set(xlabel=f"{xlabel}{spread}\naxis not from zero", title=TITLES[name])
    if mark_load and any(run.foreign_load is not None for run, _, _ in rows):
        ax.set_title(f"{TITLES[name]}\n(hatched: measured while other processes used over {LOADED:.0%} of the CPU)",
                     fontsize="medium")
    ax.grid(axis="x", alpha=0.3)
    return fig


def draw_plots(runs: Sequence[Series], grouped: bool = False) -> dict[str, bytes]:
    """The figures that have data, by file name: one Series per configuration, in table order."""
    figures = {
        LOSS_CURVES: loss_curves(runs, grouped),
        FINAL_VAL_LOSS: bars(runs, "final_val_loss", "held-out loss", FINAL_VAL_LOSS),
        TOKENS_PER_S: bars(runs, "tokens_per_s", "tokens/s", TOKENS_PER_S, mark_load=True),
    }
    return {name: _png(fig) for name, fig in figures.items() if fig is not None}
