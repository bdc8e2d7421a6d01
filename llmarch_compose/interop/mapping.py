"""The mapping between a Hugging Face checkpoint and our model, as data.

Each model type (`model_type` in config.json) is a `ModelType`: how its config maps
onto our groups and `model.` numbers and back, its tensor table (`TensorRule`s), its
config class's defaults and what its modeling code can express (`fit.Expresses`).
The functions here apply a table both ways: fusing and splitting tensors, with the
checks that make a half-mapped model impossible.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

from ..errors import LlmarchError
from .fit import Expresses


class InteropError(LlmarchError):
    """A checkpoint that cannot be represented, loaded or written; names the tensor or field."""


@dataclass(frozen=True)
class TensorRule:
    """How one of our tensors is made of checkpoint tensors.

    `theirs` holds one or more names (`{i}`: layer, `{e}`: expert). `join`:
    - copy: one tensor as is;
    - copies: one tensor the checkpoint holds under each of several names (an untied
      masked-LM bias that transformers keeps twice): read from the first, written under each;
    - cat: several concatenated along dim 0 (fused q|k|v, gate|up);
    - t: one transposed (GPT-2's Conv1D stores [in, out]);
    - row: one [1, n] tensor held as our [n] (BART's final_logits_bias);
    - heads: one fused tensor whose rows run head by head, each head's parts together
      (GPT-NeoX's query_key_value: q, k, v of head 0, then of head 1, ...), held as our
      part-major fusion (all q rows, then all k, then all v); `sizes` = (heads, parts);
    - groups: one fused tensor whose rows run key/value group by group, each group's query
      heads, then its key head, then its value head (Falcon's query_key_value: multi-query
      and multi-head layouts are the cases of one group and of one query head per group),
      held as our part-major fusion; `sizes` = (groups, query heads per group, head_dim);
    - experts: per-expert tensors (each `cat` of `theirs`) stacked and transposed to
      our [experts, in, out] layout;
    - alternate: one tensor whose last dim alternates between `len(sizes)` parts, element by
      element (gpt-oss's gate_up_proj: gate, up, gate, up, ...), held as our concatenation of
      the parts along that dim ([gate | up]).
    """

    ours: str
    theirs: tuple[str, ...]
    join: str = "copy"
    sizes: tuple[int, ...] = ()  # dim-0 sizes of the parts, for splitting a fused tensor back (heads: see above)

    def names(self, **index: int) -> tuple[str, tuple[str, ...]]:
        return self.ours.format(**index), tuple(t.format(**index) for t in self.theirs)


#: RoPE fields as configs before transformers 5 spell them (still read by it, and by `types.common.rope`).
ROPE_SPELLINGS = {"rope_theta": None, "rope_scaling": None, "partial_rotary_factor": None}


@dataclass(frozen=True)
class ModelType:
    """One Hugging Face model type: config both ways and the tensor table."""

    name: str
    architecture: str  # the class name config.json lists under "architectures"
    overrides: Callable[[Mapping[str, Any]], list[str]]  # HF config -> our overrides
    hf_config: Callable[[Any], dict[str, Any]]  # our ModelSpec -> HF config fields
    tensors: Callable[[Any], list[TensorRule]]  # our ModelSpec -> the tensor table
    # Checkpoint tensors that carry nothing we need (buffers a framework stores).
    ignore: tuple[str, ...] = ()
    stacks: Callable[[Any], dict[str, int]] = field(default=lambda spec: {"i": spec.model.n_layers})
    # Older spellings of checkpoint names, rewritten before matching: (old part, new part).
    renames: tuple[tuple[str, str], ...] = ()
    # The base model's prefix (GPT-2's "transformer."), which some uploads omit.
    prefix: str = ""
    # What the type's modeling code computes (see `fit`): to_hf writes nothing else.
    expresses: Optional[Expresses] = None
    # The transformers config class's fields, every one, with its defaults (for config.json files
    # that leave a field out); older spellings transformers still reads may join them.
    defaults: Mapping[str, Any] = field(default_factory=dict)
    # Fields real checkpoints of this type carry that the config class does not define, with the
    # value under which the model is the one transformers computes (see `fields`).
    extra_fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def fields(self) -> dict[str, Any]:
        """Every config.json field this type knows, with its default: a type whose config keeps
        RoPE in transformers 5's `rope_parameters` also reads the older spellings."""
        legacy = ROPE_SPELLINGS if "rope_parameters" in self.defaults else {}
        return {**legacy, **self.defaults, **self.extra_fields}

    def normalize(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint names as the tensor table spells them."""
        out = {}
        for name, tensor in tensors.items():
            for old, new in self.renames:
                name = name.replace(old, new)
            out[name] = tensor
        if self.prefix and not any(k.startswith(self.prefix) for k in out):
            out = {(k if k.startswith("lm_head") else self.prefix + k): v for k, v in out.items()}
        return out


def override(key: str, value: Any) -> str:
    """`key=value` in Hydra's override grammar (nested dicts and lists included)."""
    return f"{key}={_literal(value)}"


def _literal(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{_literal(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ",".join(_literal(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as an override")


def expand(rules: Iterable[TensorRule], stacks: Mapping[str, int], n_experts: int) -> list[TensorRule]:
    """Rules with their `{i}` (and per-stack indices) filled in; `{e}` stays for `experts`."""
    out = []
    for rule in rules:
        fields = {f for f in stacks if "{" + f + "}" in rule.ours}
        if not fields:
            out.append(rule)
            continue
        (name,) = fields
        for i in range(stacks[name]):
            out.append(TensorRule(rule.ours.replace("{" + name + "}", str(i)),
                                  tuple(t.replace("{" + name + "}", str(i)) for t in rule.theirs), rule.join,
                                  rule.sizes))
    return out


def regroup(tensor: torch.Tensor, outer: int, inner: int) -> torch.Tensor:
    """Rows in `outer` x `inner` blocks as `inner` x `outer` blocks (each block's rows kept in
    order): head-major q|k|v to part-major and, with the two counts swapped, back."""
    if tensor.shape[0] % (outer * inner):
        raise RuntimeError(f"{tensor.shape[0]} rows are not {outer} x {inner} equal blocks")
    rest = tensor.shape[1:]
    return tensor.reshape(outer, inner, -1, *rest).transpose(0, 1).reshape(tensor.shape)


def ungroup(tensor: torch.Tensor, groups: int, per_group: int, head_dim: int) -> torch.Tensor:
    """Group-major rows (per group: its query heads, its key head, its value head) as our
    part-major fusion (all queries, all keys, all values)."""
    rest = tensor.shape[1:]
    parts = tensor.reshape(groups, per_group + 2, head_dim, *rest)
    q, k, v = parts[:, :per_group], parts[:, per_group], parts[:, per_group + 1]
    return torch.cat([q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)])


def group(tensor: torch.Tensor, groups: int, per_group: int, head_dim: int) -> torch.Tensor:
    """The inverse of `ungroup`."""
    rest = tensor.shape[1:]
    q, k, v = tensor.split([groups * per_group * head_dim, groups * head_dim, groups * head_dim])
    parts = torch.cat([q.reshape(groups, per_group, head_dim, *rest), k.reshape(groups, 1, head_dim, *rest),
                       v.reshape(groups, 1, head_dim, *rest)], dim=1)
    return parts.reshape(tensor.shape)


def alternate(tensor: torch.Tensor, parts: int, split: bool) -> torch.Tensor:
    """The last dim's elements taken part by part (`split`: a0 b0 a1 b1 ... -> a0 a1 ... b0 b1 ...)
    or woven back element by element (the inverse)."""
    if tensor.shape[-1] % parts:
        raise RuntimeError(f"a last dim of {tensor.shape[-1]} is not {parts} equal parts")
    shape = (-1, parts) if split else (parts, -1)
    return tensor.unflatten(-1, shape).transpose(-1, -2).flatten(-2)


def to_ours(theirs: Mapping[str, torch.Tensor], rules: Sequence[TensorRule], n_experts: int
            ) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Our tensors from checkpoint tensors, and the checkpoint names used."""
    ours, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in theirs:
            raise InteropError(f"the checkpoint has no tensor {name!r}")
        used.add(name)
        return theirs[name]

    for rule in rules:
        try:
            if rule.join in ("copy", "copies"):
                ours[rule.ours] = take(rule.theirs[0])
            elif rule.join == "cat":
                ours[rule.ours] = torch.cat([take(t) for t in rule.theirs], dim=0)
            elif rule.join == "t":
                ours[rule.ours] = take(rule.theirs[0]).t()
            elif rule.join == "row":  # squeeze, not reshape: [2, n] stays a wrong shape
                ours[rule.ours] = take(rule.theirs[0]).squeeze(0)
            elif rule.join == "heads":
                ours[rule.ours] = regroup(take(rule.theirs[0]), *rule.sizes)
            elif rule.join == "groups":
                ours[rule.ours] = ungroup(take(rule.theirs[0]), *rule.sizes)
            elif rule.join == "alternate":
                ours[rule.ours] = alternate(take(rule.theirs[0]), len(rule.sizes), split=True)
            elif rule.join == "experts":
                per_expert = [torch.cat([take(t.format(e=e)) for t in rule.theirs], dim=0) for e in range(n_experts)]
                ours[rule.ours] = torch.stack(per_expert).transpose(1, 2)
            else:  # pragma: no cover - a mapping table bug
                raise ValueError(f"unknown join {rule.join!r}")
        except RuntimeError as exc:  # parts whose shapes cannot be joined
            shapes = {t: tuple(theirs[t].shape) for t in rule.theirs if t in theirs}
            raise InteropError(f"checkpoint tensors {shapes} cannot make {rule.ours!r} ({rule.join}): "
                               f"{str(exc).splitlines()[0]}") from None
    return {k: v.contiguous() for k, v in ours.items()}, used


def to_theirs(ours: Mapping[str, torch.Tensor], rules: Sequence[TensorRule]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors from ours: the inverse of `to_ours`. Every one of our tensors is
    consumed by exactly one rule and every checkpoint name written once (or, for one table
    under two of our names, twice with the same values): a tensor left over is a part of
    the model the checkpoint would silently drop."""
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(name: str, tensor: torch.Tensor, source: str) -> None:
        if name in out and not torch.equal(out[name], tensor):
            raise InteropError(f"checkpoint tensor {name!r} would be written twice with different values "
                               f"(the second time from {source!r})")
        out[name] = tensor

    for rule in rules:
        if rule.ours not in ours:
            raise InteropError(f"the model has no tensor {rule.ours!r} for checkpoint tensor(s) "
                               f"{list(rule.theirs)}")
        if rule.ours in used:
            raise InteropError(f"tensor {rule.ours!r} is written by two rules of the mapping")
        used.add(rule.ours)
        tensor = ours[rule.ours]
        if rule.join == "copy":
            put(rule.theirs[0], tensor, rule.ours)
        elif rule.join == "copies":
            for name in rule.theirs:
                put(name, tensor, rule.ours)
        elif rule.join == "t":
            put(rule.theirs[0], tensor.t(), rule.ours)
        elif rule.join == "row":
            put(rule.theirs[0], tensor.unsqueeze(0), rule.ours)
        elif rule.join == "heads":
            heads, parts = rule.sizes
            put(rule.theirs[0], regroup(tensor, parts, heads), rule.ours)
        elif rule.join == "groups":
            put(rule.theirs[0], group(tensor, *rule.sizes), rule.ours)
        elif rule.join == "cat":
            for name, part in zip(rule.theirs, tensor.split(list(rule.sizes), dim=0)):
                put(name, part, rule.ours)
        elif rule.join == "alternate":
            put(rule.theirs[0], alternate(tensor, len(rule.sizes), split=False), rule.ours)
        elif rule.join == "experts":
            for e, expert in enumerate(tensor.transpose(1, 2).unbind(0)):
                parts = expert.split(list(rule.sizes), dim=0) if len(rule.theirs) > 1 else (expert,)
                for name, part in zip(rule.theirs, parts):
                    put(name.format(e=e), part, rule.ours)
        else:  # pragma: no cover - a mapping table bug must not write a partial checkpoint
            raise ValueError(f"unknown join {rule.join!r}")
    left = sorted(set(ours) - used)
    if left:
        raise InteropError(f"{len(left)} tensor(s) of the model have no place in the checkpoint, e.g. "
                           f"{left[:3]}: writing it would drop them")
    # One tensor written under two names (a tied copy) must be two tensors for safetensors.
    seen: set[int] = set()
    written = {}
    for name, tensor in out.items():
        tensor = tensor.contiguous()
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        written[name] = tensor
    return written
