"""The sweep report's figures, rendered to PNG bytes (the report writes them).

Matplotlib runs on its Agg backend: no display is needed, and a sweep on a
server draws the same figures as one on a laptop.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .report import Job

VAL_LOSS_CURVES = "val_loss_curves.png"
FINAL_VAL_LOSS = "final_val_loss.png"
TOKENS_PER_S = "tokens_per_s.png"
TITLES = {VAL_LOSS_CURVES: "Held-out loss by step", FINAL_VAL_LOSS: "Final held-out loss",
          TOKENS_PER_S: "Training tokens/s"}


def _figure(width: float = 7.0, height: float = 4.0):
    from matplotlib.figure import Figure  # a Figure of its own needs no pyplot state or GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def loss_curves(runs: Sequence[tuple[str, "Job"]]) -> Optional[bytes]:
    curves = [(name, job.curve()) for name, job in runs]
    curves = [(name, points) for name, points in curves if points]
    if not curves:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    for name, points in curves:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="o" if len(points) < 20 else None, markersize=3, label=name)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="step", ylabel="held-out loss", title=TITLES[VAL_LOSS_CURVES])
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _png(fig)


def bars(runs: Sequence[tuple[str, "Job"]], key: str, title: str, name: str) -> Optional[bytes]:
    values = [(name, job.summary.get(key)) for name, job in runs]
    values = [(name, float(v)) for name, v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if not values:
        return None
    fig = _figure(height=max(2.0, 0.45 * len(values) + 1.2))
    ax = fig.add_subplot()
    names, numbers = zip(*values)
    positions = range(len(values))
    ax.barh(positions, numbers)
    ax.set_yticks(list(positions), names, fontsize="small")
    ax.invert_yaxis()  # job order, top to bottom
    ax.bar_label(ax.containers[0], fmt="%.4g", fontsize="small", padding=2)
    ax.set(xlabel=title, title=TITLES[name])
    ax.margins(x=0.15)
    return _png(fig)


def draw_plots(runs: Sequence[tuple[str, "Job"]]) -> dict[str, bytes]:
    """The figures that have data, by file name: (label, job) pairs in table order."""
    figures = {
        VAL_LOSS_CURVES: loss_curves(runs),
        FINAL_VAL_LOSS: bars(runs, "final_val_loss", "held-out loss", FINAL_VAL_LOSS),
        TOKENS_PER_S: bars(runs, "tokens_per_s", "tokens/s", TOKENS_PER_S),
    }
    return {name: png for name, png in figures.items() if png is not None}
