"""What a built model is made of, as plain data: the content of its diagram (`task=diagram`).

Everything is read from the model built on meta and from its spec. A part that a plugin
built names itself: its `table_label` hook, the choice and plugin names the card shows,
and the settings of the params it was built from (`BuildContext.build` leaves them on the
module as `plugin_params`: a layer's own, where a `model.layer_pattern` rule changed them).
Any other module is named by its attribute and its shape. Settings are listed by name, so
a third-party plugin, a new plugin parameter or a new topology option shows up with no
change here; only the placements of norms this module knows (pre, post) are drawn as
such, any other is named.

Layers whose parts read the same are one kind of layer: a 96-layer model with two kinds
is two boxes and a map of which layer is which, never 96 boxes.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import OmegaConf
from torch import nn

from ..config.schema import ModelConfig
from ..config.spec import ModelSpec
from ..config.structured import field_default
from ..plugin import registry as plugins
from ..plugin.interfaces import Attention, FeedForward, LayerStack, PositionEncoding, Topology, table_label
from ..plugin.registry import RESERVED_KEYS


@dataclass(frozen=True)
class Part:
    """One named part of a box: a sublayer, a norm, a table, a projection."""

    name: str  # the attribute it sits under ("attn", "tokens")
    title: str  # what it is ("MQA · mqa (plugin gqa)", "Embedding 32000 × 4096")
    notes: tuple[str, ...] = ()  # its settings ("32 heads × 128", "window 256")
    group: str = ""  # the plugin group that built it; "" for any other module
    params: int = 0  # the parameters it holds (a table shared with another part counts once)
    active: Optional[int] = None  # of those, the ones one token uses (a mixture of experts)
    moe: bool = False  # a mixture of experts
    changed: bool = False  # differs from the model-wide choice: a model.layer_pattern rule
    residual_after: bool = False  # the sublayer's output is added to the residual stream here
    cross: bool = False  # cross-attention: it reads another stack's output

    def words(self) -> list[str]:
        return [self.name, self.title, *self.notes]


@dataclass(frozen=True)
class LayerKind:
    """Layers that are built alike (the same parts, the same settings)."""

    letter: str
    layers: tuple[int, ...]
    parts: tuple[Part, ...]
    runs: int = 1  # > 1: one block's weights, run this many times (shared layers)

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)


@dataclass(frozen=True)
class Box:
    """A module outside the stacks (the embeddings, the head), with its parts."""

    name: str
    parts: tuple[Part, ...]
    notes: tuple[str, ...] = ()

    @property
    def params(self) -> int:
        return sum(p.params for p in self.parts)


@dataclass(frozen=True)
class StackView:
    name: str
    n_layers: int
    attends: str  # "causal" or "bidirectional" (its self-attention)
    reads: Optional[str]  # the stack whose output its cross-attention reads
    kinds: tuple[LayerKind, ...]
    layer_kind: tuple[int, ...]  # for each layer, its index in `kinds`
    after: tuple[Part, ...]  # the stack's own parts after its layers (a final norm)
    inputs: tuple[Box, ...]  # what feeds it: the embeddings and the position encoding
    notes: tuple[str, ...]  # norm placement and the topology options that act on its blocks
    params: int


@dataclass(frozen=True)
class Anatomy:
    model: str
    topology: str  # the topology's label ("Decoder-Only")
    components: tuple[tuple[str, str, str], ...]  # (group, choice, plugin), as the card names them
    dimensions: tuple[str, ...]  # "d_model 4096", ...
    params_total: int
    params_active: int
    stacks: tuple[StackView, ...]
    outputs: tuple[Box, ...]  # the head (and a pooler)
    options: tuple[str, ...]  # topology options not shown in a box, and the model.layer_pattern rules

    def words(self) -> list[str]:
        """Every text the diagram shows."""
        out = [self.model, self.topology, *self.dimensions, *self.options]
        out += [w for c in self.components for w in c]
        for stack in self.stacks:
            out += [stack.name, stack.attends, *stack.notes]
            for box in stack.inputs:
                out += [box.name, *box.notes, *(w for p in box.parts for w in p.words())]
            for kind in stack.kinds:
                out += [layer_set(kind.layers), *(w for p in kind.parts for w in p.words())]
            out += [w for p in stack.after for w in p.words()]
        for box in self.outputs:
            out += [box.name, *box.notes, *(w for p in box.parts for w in p.words())]
        return out


# --------------------------------------------------------------------------- settings

@functools.lru_cache(maxsize=1)
def _schema_numbers():
    """The `model.` numbers of the schema's defaults: what an interpolated default reads."""
    return OmegaConf.create({"model": OmegaConf.structured(ModelConfig)})


_UNKNOWN = object()


def _default(f: dataclasses.Field) -> Any:
    value = field_default(f, _UNKNOWN)
    if value is _UNKNOWN:
        return _UNKNOWN
    if isinstance(value, str) and value.startswith("${") and value.endswith("}"):
        try:
            return OmegaConf.select(_schema_numbers(), value[2:-1], throw_on_missing=True)
        except Exception:  # noqa: BLE001 - an interpolation the schema cannot resolve: no known default
            return _UNKNOWN
    return value


def fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):  # its fields that are set
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if getattr(value, f.name) is not None
                 and (_default(f) is _UNKNOWN or getattr(value, f.name) != _default(f))}
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in value) + "]"
    return str(value)


def settings(params: Any) -> list[tuple[str, str]]:
    """(field, text) of each setting of a params dataclass worth showing: every size (an
    integer other than 0 and 1), and any other value that is set (not None, not false) and
    differs from its default (a literal one, or the schema's value of the `model.` number it
    interpolates). A field this module has never heard of shows the same way."""
    out = []
    for f in dataclasses.fields(params):
        if f.name in RESERVED_KEYS:
            continue
        value = getattr(params, f.name)
        if value is None or value is False or (isinstance(value, (str, list, dict, tuple)) and not value):
            continue
        size = isinstance(value, int) and not isinstance(value, bool) and value not in (0, 1)
        if not size and value == _default(f):
            continue
        out.append((f.name, f.name if value is True else f"{f.name} {fmt(value)}"))
    return out


def layer_set(layers: Iterable[int]) -> str:
    """[0..31] -> "layers 0-31"; [1, 3, .., 95] -> "layers 1, 3, ..., 95 (every 2nd)"."""
    ordered = sorted(layers)
    if len(ordered) == 1:
        return f"layer {ordered[0]}"
    step = ordered[1] - ordered[0]
    if all(b - a == step for a, b in zip(ordered, ordered[1:])):
        if step == 1:
            return f"layers {ordered[0]}-{ordered[-1]}"
        if len(ordered) > 3:
            return f"layers {ordered[0]}, {ordered[1]}, ..., {ordered[-1]} (every {_ordinal(step)})"
    runs, start = [], ordered[0]
    for a, b in zip(ordered, ordered[1:] + [None]):
        if b != a + 1:
            runs.append(f"{start}-{a}" if a > start else str(a))
            start = b
    text = ", ".join(runs)
    return "layers " + (text if len(runs) <= 6 else ", ".join(runs[:5]) + f", ... ({len(runs)} runs)")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"K{i}"


# --------------------------------------------------------------------------- parts

def _shape(t) -> str:
    return " × ".join(str(s) for s in t.shape)


def choice_text(params: Any) -> str:
    """The choice as the card names it: `mqa`, or `mha (plugin gqa)`."""
    return params.name if params.plugin == params.name else f"{params.name} (plugin {params.plugin})"


def position_roles(module: PositionEncoding) -> list[str]:
    """How a position encoding enters the model, from the interface hooks it overrides."""
    own = type(module)
    roles = []
    if own.embed is not PositionEncoding.embed:
        roles.append("added to the embeddings")
    if own.rotate is not PositionEncoding.rotate:
        roles.append("rotates q and k in every attention layer")
    elif (own.attention_inputs is not PositionEncoding.attention_inputs
          or own.kernel_inputs is not PositionEncoding.kernel_inputs):
        roles.append("biases the attention scores in every layer")
    return roles or ["no position information"]


class _Describer:
    """Turns the built model's modules into parts, each parameter counted once."""

    def __init__(self, spec: ModelSpec, model: Topology):
        self.spec = spec
        self.names: dict[int, str] = {}  # id(module) -> its first qualified name (to name what is shared)
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        self.counted: set[int] = set()  # parameters already shown
        self.seen: set[int] = set()  # modules already shown
        self.norm_position = getattr(spec.params["topology"], "norm_position", None)

    def label(self, module: nn.Module) -> str:
        return table_label(type(module), module.plugin_params, self.spec.model)

    def plugin_part(self, name: str, module: nn.Module, in_block: bool = False) -> Part:
        """A module a plugin built: its label, the choice, its settings."""
        params = module.plugin_params
        group = type(module).plugin_group
        m = self.spec.model
        label, names = self.label(module), choice_text(params)
        title = label if label.lower() == names.lower() else f"{label} · {names}"
        notes: list[str] = []
        shown = settings(params)
        if isinstance(module, Attention):
            notes.append("cross-attention" if module.cross else "causal" if module.causal else "bidirectional")
            notes.append(f"{m.n_heads} heads × {m.head_dim}")
            kv = type(module).key_value_heads(params, m)
            if kv is not None:
                notes.append(f"{kv} KV heads")
                shown = [(k, t) for k, t in shown if not ("kv_heads" in k and t.endswith(f" {kv}"))]
        if isinstance(module, PositionEncoding):
            notes += position_roles(module)
        if group == "norm" and in_block and self.norm_position is not None:  # where the topology puts it
            notes.append(str(self.norm_position))
        notes += [t for _, t in shown]
        # Parts it builds from other groups' plugins (the activation, QK-norms), named as they are.
        for sub_name, sub in module.named_children():
            if hasattr(sub, "plugin_params"):
                sub_label, sub_names = self.label(sub), choice_text(sub.plugin_params)
                notes.append(f"{sub_name} {sub_label}" + ("" if sub_label.lower() == sub_names.lower()
                                                          else f" · {sub_names}"))
        changed = params != self.spec.params.get(group)  # a model.layer_pattern rule changed it here
        moe = isinstance(module, FeedForward) and type(module).mixture_of_experts
        active = module.active_params() if isinstance(module, FeedForward) else None
        cross = isinstance(module, Attention) and module.cross
        return Part(name, title, tuple(notes), group, self.numel(module), active, moe, changed, cross=cross)

    def numel(self, module: nn.Module) -> int:
        """Parameters of `module` not shown yet (a tied or shared table counts once)."""
        fresh = [p for p in module.parameters() if id(p) not in self.counted]
        self.counted.update(id(p) for p in fresh)
        return sum(p.numel() for p in fresh)

    def part(self, name: str, module: nn.Module, in_block: bool = False) -> Optional[Part]:
        """Any module: a plugin's part, a table, a projection, or a container of those."""
        if isinstance(module, nn.Identity):
            return None
        if hasattr(module, "plugin_params"):
            return self.plugin_part(name, module, in_block)
        if id(module) in self.seen:
            return Part(name, self.kind(module), (f"shared with {self.names[id(module)]}",))
        self.seen.add(id(module))
        if isinstance(module, (nn.Sequential, nn.ModuleList)):
            inner = [p for n, c in module.named_children() if (p := self.part(n, c)) is not None]
            return Part(name, ", ".join(p.title for p in inner), tuple(n for p in inner for n in p.notes),
                        params=sum(p.params for p in inner))
        notes = [] if isinstance(module, (nn.Embedding, nn.Linear)) else [
            f"{n} {_shape(p)}" for n, p in module.named_parameters(recurse=False)]
        notes += [f"{n} {_shape(b)} (buffer)" for n, b in module.named_buffers(recurse=False) if b is not None]
        notes += [f"{n}: {inner.title}" for n, c in module.named_children() if (inner := self.part(n, c))]
        return Part(name, self.kind(module), tuple(notes), params=self.numel(module))

    def kind(self, module: nn.Module) -> str:
        if isinstance(module, nn.Embedding):
            return f"Embedding {module.num_embeddings} × {module.embedding_dim}"
        if isinstance(module, nn.Linear):
            bias = " + bias" if module.bias is not None else ""
            return f"Linear {module.in_features} → {module.out_features}{bias}"
        return self.label(module) if hasattr(module, "plugin_params") else type(module).__name__

    def box(self, name: str, module: nn.Module) -> Box:
        """A module outside the stacks, part by part: its own parameters and buffers, its children
        (a plugin's module, a table or a projection is one part)."""
        if hasattr(module, "plugin_params") or isinstance(module, (nn.Embedding, nn.Linear)):
            return Box(name, (self.part(name, module),))
        parts = [Part(n, f"parameter {_shape(p)}", params=self.numel_of(p))
                 for n, p in module.named_parameters(recurse=False)]
        parts += [Part(n, f"buffer {_shape(b)}") for n, b in module.named_buffers(recurse=False) if b is not None]
        parts += [p for n, c in module.named_children() if (p := self.part(n, c)) is not None]
        return Box(name, tuple(parts))

    def numel_of(self, p: nn.Parameter) -> int:
        if id(p) in self.counted:
            return 0
        self.counted.add(id(p))
        return p.numel()

    def stack(self, name: str, stack: LayerStack, reads: Optional[str], inputs: list[Box],
              notes: list[str]) -> StackView:
        """One stack: its blocks grouped into kinds of layer (the same parts, the same settings)."""
        topology = self.spec.params["topology"]
        blocks = list(stack.blocks)
        kinds: dict[tuple[Part, ...], int] = {}
        block_kind = []
        for block in blocks:
            parts = [p for n, c in block.named_children() if (p := self.part(n, c, in_block=True)) is not None]
            block_kind.append(kinds.setdefault(tuple(_residuals(parts, topology)), len(kinds)))
        n = stack.repeats * len(blocks)  # shared layers: one block, run n_layers times
        layer_kind = tuple(block_kind[i % len(blocks)] for i in range(n))
        shared = stack.repeats if len(blocks) == 1 and stack.repeats > 1 else 1
        views = tuple(LayerKind(_letter(k), tuple(i for i in range(n) if layer_kind[i] == k), parts, shared)
                      for parts, k in kinds.items())
        # (A layer's own position module, `layer_positions`, is a layer_pattern rule's change, not a part after.)
        after = tuple(p for n_, c in stack.named_children()
                      if c is not stack.blocks and c is not getattr(stack, "layer_positions", None)
                      and (p := self.part(n_, c)))
        attention = [a for a in stack.modules() if isinstance(a, Attention)]
        causal = any(a.causal for a in attention if not a.cross)
        params = sum(k.params * (1 if k.runs > 1 else len(k.layers)) for k in views) + sum(p.params for p in after)
        placement = [f"norm_position {self.norm_position}"] if self.norm_position is not None else []
        return StackView(name, n, "causal" if causal else "bidirectional",
                         reads if any(a.cross for a in attention) else None, views, layer_kind, after,
                         tuple(inputs), tuple(placement + notes), params)


def _position_refs(module: nn.Module) -> set[int]:
    """The position encodings whose hooks `module` (or a submodule) holds as bound methods:
    how an embedding or a stack is wired to the position module that serves it."""
    refs = set()
    for sub in module.modules():
        for value in vars(sub).values():
            if inspect.ismethod(value) and isinstance(value.__self__, PositionEncoding):
                refs.add(id(value.__self__))
    return refs


def _residuals(parts: list[Part], topology: Any) -> list[Part]:
    """Where the sublayers' outputs join the residual stream, for the norm placements this
    module knows; for any other placement the parts stay in build order, the placement named."""
    position = getattr(topology, "norm_position", None)
    parallel = bool(getattr(topology, "parallel_residual", False))
    sublayer = [p.group != "norm" for p in parts]
    if position == "pre":
        if parallel:  # one add for all the branches, after the last one
            last = max((i for i, s in enumerate(sublayer) if s), default=None)
            return [dataclasses.replace(p, residual_after=i == last) for i, p in enumerate(parts)]
        return [dataclasses.replace(p, residual_after=s) for p, s in zip(parts, sublayer)]
    if position == "sandwich":  # x + norm(f(norm(x))): the add follows the norm built after each sublayer
        return [dataclasses.replace(p, residual_after=i > 0 and p.group == "norm" and sublayer[i - 1])
                for i, p in enumerate(parts)]
    if position in ("post", "post_output"):
        # post: norm(x + f(x)); post_output: x + norm(f(x)). Each norm follows the sublayer built
        # after it, the add before it (post) or after it (post_output).
        out: list[Part] = []
        pending: list[Part] = []
        for p in parts:
            if p.group == "norm":
                pending.append(p)
            elif position == "post":
                out += [dataclasses.replace(p, residual_after=True), *pending]
                pending = []
            else:
                out += [p, *(dataclasses.replace(n, residual_after=i == len(pending) - 1)
                             for i, n in enumerate(pending))]
                pending = []
        return out + pending
    return parts


def _route(options: list[tuple[str, str]]) -> dict[str, list[str]]:
    """Where a topology option is shown, read from its name: the head's (head, logit, tie), the
    embeddings' (embed), and the stacks' (everything else, a name never heard of included)."""
    places: dict[str, list[str]] = {"head": [], "embed": [], "stack": []}
    for key, text in options:
        place = ("head" if any(w in key for w in ("head", "logit", "tie")) else "embed" if "embed" in key
                 else "stack")
        places[place].append(text)
    return places


def describe(spec: ModelSpec, model: Optional[Topology] = None) -> Anatomy:
    """The anatomy of the model `spec` describes (built on meta unless `model` is given)."""
    from .card import count_params

    if model is None:
        from .build import build

        model = build(spec, device="meta")
    d = _Describer(spec, model)
    m = spec.model
    topology = spec.params["topology"]
    options = _route([(k, t) for k, t in settings(topology) if k != "norm_position"])
    # The topology's children in build order: what comes before its last stack feeds a stack,
    # what comes after reads the last one (the head).
    # (A topology without a LayerStack is drawn as its children, one box each.)
    children = list(model.named_children())
    stacks = [(n, c) for n, c in children if isinstance(c, LayerStack)]
    last = max((i for i, (_, c) in enumerate(children) if isinstance(c, LayerStack)), default=-1)
    positions = [(n, c) for n, c in children if isinstance(c, PositionEncoding) and stacks]
    others = [(i, n, c) for i, (n, c) in enumerate(children)
              if not isinstance(c, LayerStack) and not (stacks and isinstance(c, PositionEncoding))]

    # An embedding or a position encoding serves the stack wired to the same position module
    # (else the stack in the same place of the order, else the first).
    refs = {id(c): _position_refs(c) for _, c in stacks}

    def serving(module: nn.Module, k: int, count: int) -> str:
        own = {id(module)} if isinstance(module, PositionEncoding) else _position_refs(module)
        matches = [n for n, c in stacks if refs[id(c)] & own]
        return matches[0] if len(matches) == 1 else stacks[k][0] if count == len(stacks) else stacks[0][0]

    fed: dict[str, list[Box]] = {n: [] for n, _ in stacks}
    inputs = [(n, c) for i, n, c in others if i < last]
    for k, (name, module) in enumerate(inputs):
        fed[serving(module, k, len(inputs))].append(dataclasses.replace(d.box(name, module),
                                                                        notes=tuple(options["embed"])))
    for k, (name, module) in enumerate(positions):
        boxes = fed[serving(module, k, len(positions))]
        part = d.part(name, module)
        if boxes:
            boxes[-1] = dataclasses.replace(boxes[-1], parts=(*boxes[-1].parts, part))
        else:
            boxes.append(Box(name, (part,)))
    # A stack's cross-attention reads the stack before it (the encoder's output).
    views = tuple(d.stack(name, stack, stacks[i - 1][0] if i else None, fed[name], options["stack"])
                  for i, (name, stack) in enumerate(stacks))

    outputs = []
    tied = model.tied_embedding()
    for k, (name, module) in enumerate((n, c) for i, n, c in others if i > last):
        box = d.box(name, module)
        if k == 0:  # the head: the table it reuses (or not), and the options that act on it
            table = () if tied is None else (Part("weight", f"tied to {d.names[id(tied)]}",
                                                  (f"{tied.num_embeddings} × {tied.embedding_dim}",)),)
            untied = ("not tied to the token table",) if tied is None else ()
            box = dataclasses.replace(box, parts=(*table, *box.parts), notes=(*untied, *options["head"]))
        outputs.append(box)
    rules = [f"model.layer_pattern[{i}]: {fmt(rule)}" for i, rule in enumerate(m.layer_pattern)]
    counts = count_params(model)
    return Anatomy(
        model=m.name,
        topology=table_label(type(model), topology, m),
        components=tuple((g, spec.params[g].name, spec.params[g].plugin) for g in plugins.GROUPS),
        dimensions=(f"d_model {m.d_model}", f"{m.n_layers} layers", f"{m.n_heads} heads", f"vocab {m.vocab_size}",
                    f"context {m.max_seq_len}"),
        params_total=counts["params_total"],
        params_active=counts["params_active"],
        stacks=views,
        outputs=tuple(outputs),
        options=tuple([*(options["head"] if not outputs else []), *rules]),
    )


__all__ = ["Anatomy", "Box", "LayerKind", "Part", "StackView", "describe", "layer_set", "settings"]
