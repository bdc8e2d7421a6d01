"""What a Hugging Face model type can express, as data, and the one check against it.

Each `ModelType` carries an `Expresses`: for every component group the plugins the
type's modeling code has and, per plugin, the values each params field may take;
the `model.` numbers the topologies read directly (head_dim, embeddings, tying);
which stacks exist and what a layer pattern may change in some layers; and the few
relations that span groups (`Rule`). `problems(spec, expresses)` compares a whole
`ModelSpec` against it and lists every field that does not fit, in a fixed order
(plugins first, then params group by group, then layers and rules).

A params field the declaration does not mention must be at its default: a field a
plugin gains later is refused until some type declares it, never silently dropped.
A default that interpolates a `model.` number (`${model.qkv_bias}`) is that number's
default; one that cannot be resolved so is refused unless declared.

`guess` picks the first type in the registry's order that fits; when none does it
names the closest: the type with the fewest failing fields (ties: the earlier
type), and that type's first failing field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from ..errors import ConfigError
from ..config.schema import ModelConfig
from ..config.structured import field_default

_SKIP = ("plugin", "name")  # the group node's own keys, not the plugin's params
_NO_DEFAULT = object()


@dataclass(frozen=True)
class Allowed:
    """The values one field may take: `values`, or those for which `test(value, spec)` holds."""

    values: tuple = ()
    test: Optional[Callable[[Any, Any], bool]] = None
    valid: Optional[str] = None  # how to list what is valid when `test` decides
    why: Optional[str] = None  # what the type cannot express, when the generic phrase says too little

    def holds(self, value: Any, spec: Any) -> bool:
        if self.test is not None:
            return bool(self.test(value, spec))
        return any(same(value, v) for v in self.values)

    def listing(self, spec: Any) -> Any:
        if self.valid is not None:
            return self.valid
        return list(self.values)


def only(*values: Any, why: Optional[str] = None) -> Allowed:
    return Allowed(values=values, why=why)


def where(test: Callable[[Any, Any], bool], valid: str, why: Optional[str] = None) -> Allowed:
    return Allowed(test=test, valid=valid, why=why)


ANY = where(lambda value, spec: True, "any value")


@dataclass(frozen=True)
class Rule:
    """A relation spanning fields: `value(spec)` is reported under `key` when `holds(spec)` fails."""

    key: str
    value: Callable[[Any], Any]
    holds: Callable[[Any], bool]
    valid: Any
    why: str


@dataclass(frozen=True)
class Expresses:
    """What one model type's modeling code computes, field by field."""

    # group -> plugin -> params field -> Allowed (nested dataclass fields as "scaling.type")
    groups: Mapping[str, Mapping[str, Mapping[str, Allowed]]]
    # `model.` fields the topologies read directly, besides what the groups interpolate
    model: Mapping[str, Allowed]
    stacks: tuple[str, ...] = ("decoder",)
    # group -> plugin -> params: what a layer pattern may make of a group in some layers
    layers: Mapping[str, Mapping[str, Mapping[str, Allowed]]] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    # Written exactly, but read back as something else: never chosen by `guess`.
    guess_rules: tuple[Rule, ...] = ()


#: The `model.` fields every declaration must state (the topologies read them directly).
MODEL_FIELDS = ("head_dim", "tie_embeddings", "embedding_dim", "type_vocab_size")

#: Generic phrases for "<type> cannot express ..." by key; the fallback names the value.
PHRASES = {
    "topology.normalize_head": "a normalized LM head",
    "topology.final_logit_softcap": "a cap on the logits",
    "topology.logit_scale": "a factor on the logits",
    "topology.parallel_residual": "a parallel residual",
    "topology.shared_norm": "one norm shared by attention and the FFN",
    "topology.norm_position": "this norm placement",
    "topology.residual": "this residual",
    "topology.share_layers": "one block shared by every layer",
    "topology.embedding_norm": "this norm on the embeddings",
    "topology.scale_embeddings": "embeddings scaled by sqrt(d_model)",
    "norm.offset": "a norm scaled by (offset + weight)",
    "topology.mlm_transform": "this head transform",
    "topology.head_bias": "this LM-head bias",
    "topology.scale_tied_head": "this scaling of the LM head",
    "topology.pooler": "this pooler",
    "topology.tie_embeddings": "a head tied otherwise than model.tie_embeddings says",
    "model.layer_pattern": "layers that differ this way",
}


Mismatch = tuple[str, Any, str, Any]  # (key, value, what cannot be expressed, valid)


def same(a: Any, b: Any) -> bool:
    """Equality that keeps booleans apart from numbers (False is not 0 here)."""
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def show(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else value


def _default(f: dataclasses.Field) -> Any:
    value = field_default(f, _NO_DEFAULT)
    return _NO_DEFAULT if value is _NO_DEFAULT else _resolve(value, "model")


def _resolve(value: Any, node: str) -> Any:
    """A `${model.x}` (or, inside model, `${.x}`) default as ModelConfig's default for x."""
    if not (isinstance(value, str) and value.startswith("${") and value.endswith("}")):
        return value
    ref = value[2:-1]
    name = ref[1:] if ref.startswith(".") and node == "model" else ref.partition("model.")[2]
    fields = {f.name: f for f in dataclasses.fields(ModelConfig)}
    if not name or name not in fields:
        return _NO_DEFAULT
    return _default(fields[name])


def _phrase(key: str, allowed: Optional[Allowed] = None) -> str:
    why = allowed.why if allowed is not None else None
    return why or PHRASES.get(key) or "this " + key.rsplit(".", 1)[-1].replace("_", " ")


def _params(group: str, params: Any, declared: Mapping[str, Allowed], spec: Any, type_name: str,
            out: list[Mismatch], path: str = "") -> None:
    """Every field of `params` against `declared` (keys relative to the group, nested
    dataclass fields as "scaling.type"); an undeclared field must keep its default."""
    for f in dataclasses.fields(params):
        if f.name in _SKIP and not path:
            continue
        local = f"{path}{f.name}"
        key, value = f"{group}.{local}", getattr(params, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _params(group, value, declared, spec, type_name, out, path=local + ".")
            continue
        if local in declared:
            allowed = declared[local]
            if not allowed.holds(value, spec):
                out.append((key, value, f"{type_name} cannot express {_phrase(key, allowed)}",
                            allowed.listing(spec)))
            continue
        default = _default(f)
        if default is _NO_DEFAULT or not same(value, default):
            valid = "nothing: the field is not declared" if default is _NO_DEFAULT else [default]
            out.append((key, value, f"{type_name} cannot express {_phrase(key)} "
                        "(a field the model type does not declare must keep its default)", valid))


def _group(key: str, params: Any, declared: Mapping[str, Mapping[str, Allowed]], spec: Any, type_name: str,
           out: list[Mismatch]) -> None:
    if params.plugin not in declared:
        out.append((key, params.name, f"{type_name} has no {key} of this kind", sorted(declared)))
        return
    _params(key, params, declared[params.plugin], spec, type_name, out)


def problems(spec: Any, expresses: Expresses, type_name: str, guessing: bool = False) -> list[Mismatch]:
    """Every field of `spec` the type cannot express, in the order they are checked."""
    out: list[Mismatch] = []
    plugins_ok = True
    for group, params in spec.params.items():  # every plugin first: a wrong one explains its params
        declared = expresses.groups.get(group, {})
        if params.plugin not in declared:
            out.append((group, params.name, f"{type_name} has no {group} of this kind", sorted(declared)))
            plugins_ok = False
    for group, params in spec.params.items():
        if params.plugin in expresses.groups.get(group, {}):
            _params(group, params, expresses.groups[group][params.plugin], spec, type_name, out)
    for name in MODEL_FIELDS:
        allowed, value = expresses.model[name], getattr(spec.model, name)
        if not allowed.holds(value, spec):
            out.append((f"model.{name}", value, f"{type_name} cannot express {_phrase(f'model.{name}', allowed)}",
                        allowed.listing(spec)))
    layers = [(stack, layer, group, params) for (stack, layer), changes in sorted(spec.layer_params.items())
              if stack in expresses.stacks  # the others are stacks the topology does not build
              for group, params in changes.items()]
    for stack, layer, group, params in layers:  # the first layer that does not fit, reported once
        if params == spec.params[group]:
            continue
        found: list[Mismatch] = []
        if group in expresses.layers:
            _group(group, params, expresses.layers[group], spec, type_name, found)
        else:
            found.append(("", None, f"{type_name} has the same {group} in every layer", None))
        if found:
            _, value, why, valid = found[0]
            detail = "" if value is None else f", {show(value)}"
            out.append(("model.layer_pattern", list(spec.model.layer_pattern),
                        f"{type_name} cannot express the layer pattern ({stack} layer {layer}: {why}{detail})",
                        valid))
            break
    if plugins_ok:  # relations read params the plugins above must have
        for rule in (*expresses.rules, *(expresses.guess_rules if guessing else ())):
            if not rule.holds(spec):
                out.append((rule.key, rule.value(spec), f"{type_name} cannot express {rule.why}", rule.valid))
    return out


def _error(mismatch: Mismatch, prefix: str = "") -> ConfigError:
    key, value, why, valid = mismatch
    return ConfigError(key, value, prefix + why, valid)


def ensure_fits(spec: Any, kind: Any) -> None:
    """Refuse `spec` for model type `kind`, naming the first field that does not fit."""
    if kind.expresses is None:  # pragma: no cover - a table without a declaration
        raise ConfigError("model_type", kind.name, "this model type declares nothing it can express")
    found = problems(spec, kind.expresses, kind.name)
    if found:
        raise _error(found[0])


def guess(spec: Any, kinds: Iterable[Any]) -> Any:
    """The first of `kinds` that fits `spec`; none fitting, a ConfigError naming the closest
    type (fewest failing fields, the earlier on a tie) and its first failing field."""
    best: Optional[tuple[int, Any, Sequence[Mismatch]]] = None
    for kind in kinds:
        found = problems(spec, kind.expresses, kind.name, guessing=True)
        if not found:
            return kind
        if best is None or len(found) < best[0]:
            best = (len(found), kind, found)
    assert best is not None
    n, kind, found = best
    raise _error(found[0], f"no Hugging Face model type fits this model; the closest is {kind.name} "
                           f"({n} field{'s' if n > 1 else ''} off), where ")


def fits(spec: Any, kind: Any, guessing: bool = False) -> bool:
    return not problems(spec, kind.expresses, kind.name, guessing=guessing)
