"""The architecture diagram: a model's anatomy (model/anatomy.py) drawn with matplotlib,
written as SVG (its text kept as text, so it can be searched) and PNG.

One column per stack, top to bottom: what feeds it (embeddings, the position encoding),
the stack with a map of which layer is which kind and one box per kind of layer (its
sublayers in order, the residual adds on the stream's rail), then the head. An
encoder-decoder's cross-attention gets an arrow from the encoder's output. Everything is
laid out in inches on one axes whose limits are the figure's size.
"""

from __future__ import annotations

import io
import textwrap
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..plugin import registry as plugins
from .anatomy import Anatomy, Box, LayerKind, Part, StackView, describe, layer_set

SVG, PNG = "diagram.svg", "diagram.png"

# Sizes in inches and points.
COLUMN = 7.4  # one stack's column
GAP = 0.9  # between columns (the cross-attention arrow runs here)
MARGIN = 0.3
NAME_W = 1.15  # the attribute-name column of a row
COUNT_W = 1.0  # the parameter-count column of a row
PT = 1 / 72
TITLE_PT, HEAD_PT, PART_PT, NOTE_PT = 13, 9.5, 8.5, 7.5
CHAR_W = 0.56  # average glyph width of the sans font, in ems (for wrapping)
LINE = 1.35  # line height, in ems

KIND_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C",
                "#CCB974", "#64B5CD")
FILL = {"norm": "#EFEFEF", "attention": "#DCE9F7", "ffn": "#E2F0DC", "moe": "#FBE2CC", "position": "#F1E4F6",
        "": "#FFFFFF"}
EDGE, CHANGED_EDGE, MUTED = "#555555", "#C05A00", "#555555"


def count(n: float, digits: int = 3) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.{digits}g}{suffix}"
    return f"{n:g}"


def params_text(params: int, active: Optional[int] = None) -> str:
    if not params:
        return ""
    text = f"{count(params)} params"
    return text + (f", {count(active)} active" if active is not None and active != params else "")


def text_width(text: str, pt: float, bold: bool = False) -> float:
    """An estimate, in inches, on the generous side (bold glyphs are wider)."""
    return len(text) * pt * (CHAR_W + (0.1 if bold else 0.02)) * PT


def wrap(text: str, width_in: float, pt: float) -> list[str]:
    chars = max(12, int(width_in / (pt * CHAR_W * PT)))
    return textwrap.wrap(text, chars, break_on_hyphens=False) or [""]


def lines_height(n: int, pt: float) -> float:
    return n * pt * LINE * PT


@dataclass
class _Canvas:
    """Draws on one axes in inches, y growing downwards."""

    ax: Any

    def box(self, x, y, w, h, fill="#FFFFFF", edge=EDGE, lw=0.8, dashed=False, radius=0.06, z=1):
        from matplotlib.patches import FancyBboxPatch

        self.ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}",
                                         facecolor=fill, edgecolor=edge, linewidth=lw,
                                         linestyle=(0, (4, 2)) if dashed else "-", zorder=z))

    def text(self, x, y, s, pt=PART_PT, weight="normal", colour="#111111", ha="left", va="top", style="normal",
             z=5, family="sans-serif"):
        self.ax.text(x, y, s, fontsize=pt, fontweight=weight, color=colour, ha=ha, va=va, style=style, zorder=z,
                     family=family)

    def arrow(self, x0, y0, x1, y1, colour=EDGE, rad=0.0, lw=1.0, z=3):
        from matplotlib.patches import FancyArrowPatch

        self.ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, color=colour,
                                          linewidth=lw, connectionstyle=f"arc3,rad={rad}", zorder=z,
                                          shrinkA=0, shrinkB=0))

    def line(self, xs, ys, colour=EDGE, lw=1.0, z=2):
        self.ax.plot(xs, ys, color=colour, linewidth=lw, zorder=z, solid_capstyle="butt")

    def residual(self, x, y, r=0.075):
        from matplotlib.patches import Circle

        self.ax.add_patch(Circle((x, y), r, facecolor="#FFFFFF", edgecolor=EDGE, linewidth=0.9, zorder=4))
        self.line([x - r * 0.6, x + r * 0.6], [y, y], lw=0.9, z=5)
        self.line([x, x], [y - r * 0.6, y + r * 0.6], lw=0.9, z=5)


CHANGED_MARK = "set by model.layer_pattern"  # beside a part a layer_pattern rule changed


class _Layout:
    """Places every box of the anatomy, top to bottom, column by column."""

    def __init__(self, canvas: _Canvas):
        self.c = canvas
        self.cross_targets: list[tuple[float, float]] = []  # (x, y) of cross-attention rows
        self.stack_out: dict[str, tuple[float, float]] = {}  # a stack's output point (x, y)

    # ---- one row: a part
    def part_height(self, part: Part, width: float) -> float:
        inline, note_lines = self._notes(part, width)
        below = len(note_lines) if note_lines and inline is None else 1 if part.changed else 0
        return lines_height(1, PART_PT) + lines_height(below, NOTE_PT) + 0.1

    def _notes(self, part: Part, width: float) -> tuple[Optional[float], list[str]]:
        """The notes' lines, and the x offset where they fit on the title's line (None: below it)."""
        if not part.notes:
            return None, []
        text = " · ".join(part.notes)
        title_end = NAME_W + text_width(part.title, PART_PT, bold=True) + 0.2
        room = width - title_end - COUNT_W - 0.1
        if not part.changed and text_width(text, NOTE_PT) <= room:
            return title_end, [text]
        # A changed part's first line below the title ends with its mark: the notes leave it room.
        mark = text_width(CHANGED_MARK, NOTE_PT - 0.5) + 0.15 if part.changed else 0.0
        return None, wrap(text, width - NAME_W - 0.2 - mark, NOTE_PT)

    def part(self, part: Part, x: float, y: float, width: float) -> float:
        h = self.part_height(part, width)
        fill = FILL["moe"] if part.moe else FILL.get(part.group, FILL[""])
        self.c.box(x, y, width, h, fill=fill, edge=CHANGED_EDGE if part.changed else EDGE,
                   lw=1.4 if part.changed else 0.7, dashed=part.changed, radius=0.04, z=2)
        top = y + 0.05
        self.c.text(x + 0.08, top, part.name, pt=NOTE_PT, colour=MUTED, family="monospace")
        title_w = width - NAME_W - COUNT_W - 0.1
        title = part.title
        max_chars = int(title_w / (PART_PT * CHAR_W * PT))
        if len(title) > max_chars:
            title = title[: max_chars - 1] + "…"
        self.c.text(x + NAME_W, top, title, pt=PART_PT, weight="bold")
        self.c.text(x + width - 0.08, top, params_text(part.params, part.active), pt=NOTE_PT, colour=MUTED,
                    ha="right")
        line_y = top + lines_height(1, PART_PT)
        if part.changed:
            self.c.text(x + width - 0.08, line_y, CHANGED_MARK, pt=NOTE_PT - 0.5,
                        colour=CHANGED_EDGE, ha="right", style="italic")
        inline, notes = self._notes(part, width)
        if inline is not None:
            self.c.text(x + inline, top + 0.01, notes[0], pt=NOTE_PT, colour="#333333")
        elif notes:
            self.c.text(x + NAME_W, line_y, "\n".join(notes), pt=NOTE_PT, colour="#333333")
        if part.cross:
            self.cross_targets.append((x, y + h / 2))
        return y + h

    # ---- a box outside the stacks
    def box(self, box: Box, x: float, y: float, width: float) -> float:
        top = y
        y += 0.08
        header = box.name + (f"  ({params_text(box.params)})" if box.params else "")
        self.c.text(x + 0.1, y, header, pt=HEAD_PT, weight="bold")
        y += lines_height(1, HEAD_PT)
        if box.notes:
            notes = wrap(" · ".join(box.notes), width - 0.2, NOTE_PT)
            self.c.text(x + 0.1, y, "\n".join(notes), pt=NOTE_PT, colour=MUTED)
            y += lines_height(len(notes), NOTE_PT)
        for part in box.parts:
            y = self.part(part, x + 0.1, y + 0.04, width - 0.2)
        y += 0.1
        self.c.box(x, top, width, y - top, fill="#FAFAFA", z=1)
        return y

    # ---- a stack
    def layer_map(self, stack: StackView, x: float, y: float, width: float) -> float:
        n = len(stack.layer_kind)
        label_w = 0.75
        self.c.text(x, y + 0.02, "layer map", pt=NOTE_PT, colour=MUTED)
        cell = min(0.3, (width - label_w) / n)
        x0 = x + label_w
        for i, k in enumerate(stack.layer_kind):
            colour = KIND_COLOURS[k % len(KIND_COLOURS)]
            self.c.box(x0 + i * cell, y, cell, 0.2, fill=colour, edge="#FFFFFF", lw=0.4 if cell > 0.05 else 0,
                       radius=0.0, z=2)
            if cell >= 0.13 and len(stack.kinds) > 1:
                self.c.text(x0 + (i + 0.5) * cell, y + 0.1, stack.kinds[k].letter, pt=6, colour="#FFFFFF",
                            ha="center", va="center", weight="bold")
        step = 1
        while step * cell < 0.32:
            step = {1: 2, 2: 4, 4: 8, 8: 10}.get(step, step * 2 if step < 10 else step + 10)
        ticks = sorted({*range(0, n, step), n - 1})
        if len(ticks) > 1 and (ticks[-1] - ticks[-2]) * cell < 0.25:
            ticks.pop(-2)
        for i in ticks:
            self.c.text(x0 + (i + 0.5) * cell, y + 0.23, str(i), pt=6, colour=MUTED, ha="center")
        return y + 0.23 + lines_height(1, 6) + 0.05

    def kind(self, kind: LayerKind, index: int, x: float, y: float, width: float) -> float:
        colour = KIND_COLOURS[index % len(KIND_COLOURS)]
        top = y
        y += 0.07
        self.c.box(x + 0.1, y, 0.26, 0.2, fill=colour, edge=colour, radius=0.03, z=3)
        self.c.text(x + 0.23, y + 0.1, kind.letter, pt=8, colour="#FFFFFF", weight="bold", ha="center", va="center")
        what = (f"{layer_set(kind.layers)}: one block, shared, run ×{kind.runs}" if kind.runs > 1
                else f"{layer_set(kind.layers)}  (×{len(kind.layers)})")
        per = params_text(kind.params, None)
        self.c.text(x + 0.45, y + 0.02, what, pt=HEAD_PT - 0.5, weight="bold")
        if per:
            self.c.text(x + width - 0.1, y + 0.03, per + (" per layer" if kind.runs == 1 else ""), pt=NOTE_PT,
                        colour=MUTED, ha="right")
        y += 0.3
        rail = x + 0.23
        rows_x = x + 0.45
        rows_w = width - 0.55
        has_rail = any(p.residual_after for p in kind.parts)
        first = y
        marks = []
        for part in kind.parts:
            row_top = y
            y = self.part(part, rows_x, y, rows_w)
            if part.residual_after:
                marks.append((row_top + y) / 2)
            y += 0.05
        if has_rail:
            self.c.line([rail, rail], [first - 0.05, y], colour="#888888", lw=1.6, z=2)
            for my in marks:
                self.c.line([rail, rows_x], [my, my], colour="#888888", lw=0.9, z=2)
                self.c.residual(rail, my)
        y += 0.05
        self.c.box(x, top, width, y - top, fill="#FFFFFF", edge=colour, lw=1.3, z=1)
        return y

    def inputs(self, stack: StackView, x: float, y: float, width: float) -> float:
        """What feeds the stack (its embeddings, its position encoding), box under box."""
        for i, box in enumerate(stack.inputs):
            y = self.box(box, x, y, width)
            if i < len(stack.inputs) - 1:
                self.c.arrow(x + width / 2, y, x + width / 2, y + 0.25)
                y += 0.25
        return y

    def stack(self, stack: StackView, x: float, y: float, width: float) -> float:
        top = y
        y += 0.08
        header = f"{stack.name} stack · {stack.n_layers} layers · {stack.attends}"
        if stack.reads:
            header += f" · cross-attention to the {stack.reads}'s output"
        self.c.text(x + 0.1, y, header, pt=HEAD_PT + 0.5, weight="bold")
        if stack.params:
            self.c.text(x + width - 0.1, y + 0.02, params_text(stack.params), pt=NOTE_PT, colour=MUTED, ha="right")
        y += lines_height(1, HEAD_PT + 0.5)
        if stack.notes:
            notes = wrap(" · ".join(stack.notes), width - 0.2, NOTE_PT)
            self.c.text(x + 0.1, y, "\n".join(notes), pt=NOTE_PT, colour=MUTED)
            y += lines_height(len(notes), NOTE_PT)
        if len(stack.kinds) > 1:  # which layer is which kind
            y = self.layer_map(stack, x + 0.1, y + 0.06, width - 0.2)
        y += 0.04
        for i, kind in enumerate(stack.kinds):
            y = self.kind(kind, i, x + 0.1, y, width - 0.2) + 0.08
        for part in stack.after:
            y = self.part(part, x + 0.1, y, width - 0.2) + 0.05
        y += 0.06
        self.c.box(x, top, width, y - top, fill="#F6F6F6", edge="#333333", lw=1.1, z=0)
        self.stack_out[stack.name] = (x + width, y - 0.25)
        return y


def _header(c: _Canvas, anatomy: Anatomy, x: float, y: float, width: float) -> float:
    total = f"{count(anatomy.params_total, 4)} parameters"
    if anatomy.params_active != anatomy.params_total:
        total += f", {count(anatomy.params_active, 4)} active per token"
    c.text(x, y, f"{anatomy.model} · {anatomy.topology}", pt=TITLE_PT, weight="bold")
    y += lines_height(1, TITLE_PT) + 0.02
    lines = wrap(" · ".join([total, *anatomy.dimensions]), width, PART_PT)
    c.text(x, y, "\n".join(lines), pt=PART_PT, colour="#333333")
    y += lines_height(len(lines), PART_PT)
    # No-break spaces: a line may end between two components, never inside one.
    components = " · ".join(f"{g}\u00a0{choice}" + (f"\u00a0(plugin\u00a0{plugin})" if plugin != choice else "")
                            for g, choice, plugin in anatomy.components)
    lines = wrap("components: " + components, width, PART_PT)
    c.text(x, y, "\n".join(lines), pt=PART_PT, colour="#333333")
    return y + lines_height(len(lines), PART_PT) + 0.15


def _legend(c: _Canvas, anatomy: Anatomy, x: float, y: float, width: float) -> float:
    if anatomy.options:
        lines = [w for option in anatomy.options for w in wrap(option, width, NOTE_PT)]
        c.text(x, y, "\n".join(lines), pt=NOTE_PT, colour=MUTED)
        y += lines_height(len(lines), NOTE_PT) + 0.08
    items = [("norm", dict(fill=FILL["norm"])), ("attention", dict(fill=FILL["attention"])),
             ("feed-forward", dict(fill=FILL["ffn"])), ("mixture of experts", dict(fill=FILL["moe"])),
             ("position", dict(fill=FILL["position"])), ("residual add", None),
             ("set by a model.layer_pattern rule", dict(edge=CHANGED_EDGE, lw=1.4, dashed=True))]
    cx = x
    for name, style in items:
        needed = 0.35 + text_width(name, NOTE_PT) + 0.2
        if cx + needed > x + width:  # the next line
            cx, y = x, y + 0.24
        if style is None:
            c.residual(cx + 0.11, y + 0.07)
        else:
            c.box(cx, y, 0.22, 0.14, radius=0.02, **style)
        c.text(cx + 0.3, y, name, pt=NOTE_PT, colour=MUTED)
        cx += needed
    return y + 0.25


def draw(anatomy: Anatomy):
    """The diagram as a matplotlib Figure (its own: no pyplot state, no display)."""
    from matplotlib.figure import Figure

    columns = max(1, len(anatomy.stacks))
    width = 2 * MARGIN + columns * COLUMN + (columns - 1) * GAP
    fig = Figure()
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    c = _Canvas(ax)
    layout = _Layout(c)
    y = _header(c, anatomy, MARGIN, MARGIN, width - 2 * MARGIN)
    # What feeds each stack, then the stacks side by side, their tops aligned.
    ends = [layout.inputs(stack, MARGIN + i * (COLUMN + GAP), y, COLUMN) for i, stack in enumerate(anatomy.stacks)]
    y_stacks = max(ends, default=y) + 0.3
    bottoms = []
    for i, (stack, end) in enumerate(zip(anatomy.stacks, ends)):
        x = MARGIN + i * (COLUMN + GAP)
        if stack.inputs:
            c.arrow(x + COLUMN / 2, end, x + COLUMN / 2, y_stacks)
        bottoms.append(layout.stack(stack, x, y_stacks, COLUMN))
    # The head follows the last stack (its output is what the head reads).
    x = MARGIN + (columns - 1) * (COLUMN + GAP)
    y_out = bottoms[-1] if bottoms else y
    for box in anatomy.outputs:
        c.arrow(x + COLUMN / 2, y_out, x + COLUMN / 2, y_out + 0.25)
        y_out = layout.box(box, x, y_out + 0.25, COLUMN)
    # Cross-attention reads the output of the stack before it.
    for stack in anatomy.stacks:
        if stack.reads and stack.reads in layout.stack_out:
            sx, sy = layout.stack_out[stack.reads]
            for tx, ty in layout.cross_targets:
                if tx > sx:
                    c.arrow(sx, sy, tx, ty, colour="#2F6DB3", rad=0.25, lw=1.3, z=6)
            c.text(sx + 0.06, sy + 0.1, f"{stack.reads}\noutput", pt=NOTE_PT, colour="#2F6DB3")
    y = max([y_out, *bottoms]) + 0.2
    y = _legend(c, anatomy, MARGIN, y, width - 2 * MARGIN) + MARGIN
    fig.set_size_inches(width, y)
    ax.set_xlim(0, width)
    ax.set_ylim(y, 0)
    return fig


def render(anatomy: Anatomy, fmt: str, dpi: int = 110) -> bytes:
    """The drawing as `svg` (text kept as text) or `png` bytes."""
    import matplotlib

    fig = draw(anatomy)
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "llmarch"}):
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
    return buffer.getvalue()


#: The drawings made in this process, by what they depend on (a sweep over seeds draws one).
_DRAWN: "OrderedDict[tuple, dict[str, bytes]]" = OrderedDict()
_KEEP = 8


def _key(spec: Any) -> tuple:
    """What a drawing depends on: the spec and the classes its plugins are (a plugin registered
    again under the same name is another drawing)."""
    params = [*spec.params.items(), *((g, p) for layer in spec.layer_params.values() for g, p in layer.items())]
    classes = sorted({f"{g}:{p.plugin}:{id(plugins.get(g, p.plugin).cls)}" for g, p in params})
    return repr(spec), tuple(classes)


def drawings(spec: Any, model: Any = None) -> dict[str, bytes]:
    """The SVG and PNG bytes of the model `spec` describes (`model`: it, already built)."""
    key = _key(spec)
    if key not in _DRAWN:
        anatomy = describe(spec, model)
        _DRAWN[key] = {"svg": render(anatomy, "svg"), "png": render(anatomy, "png")}
        while len(_DRAWN) > _KEEP:
            _DRAWN.popitem(last=False)
    _DRAWN.move_to_end(key)
    return _DRAWN[key]


def write_diagram(spec: Any, folder: Union[str, Path], model: Any = None) -> dict[str, Path]:
    """Write diagram.svg and diagram.png of the model `spec` describes into `folder`."""
    from ..artifacts.atomic import write_atomic

    folder = Path(folder)
    paths = {"svg": folder / SVG, "png": folder / PNG}
    for kind, data in drawings(spec, model).items():
        write_atomic(paths[kind], data)
    return paths


__all__ = ["SVG", "PNG", "draw", "drawings", "render", "write_diagram"]
