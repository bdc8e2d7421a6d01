"""Equal budgets: one free dimension set so that a card figure meets a target.

`model.match` names the figure (`params`, `active_params`, `flops_per_token`,
`kv_cache_bytes`; null: off), `model.match_target` the budget (a number, a preset's
figure at the run's scale, or `baseline`: the first job of the sweep), `model.match_by`
the dimension that moves (`ffn_dim`, `d_model`, `n_layers`, `n_experts`) and
`model.match_multiple` the step it moves in. Before anything is built, `matched_spec`
sets the dimension to the allowed value whose figure, exactly as the architecture card
computes it (a model built on meta), is closest to the target; a tie goes to the smaller
value. `settled` writes the value found into the config, so that what a run records (a
checkpoint's config resolves its interpolations) describes the model it built.

The figures grow with each dimension and are affine or quadratic in it, so the search
fits a line or a parabola through the figures seen so far and probes where it meets the
target, keeping a bracket and bisecting when a probe does not halve it: a handful of
builds at any size, and still correct for a figure that is neither (a layer pattern).

`baseline` is resolved per sweep, not per job: when a sweep starts, the sweep callback
records the figures of its first job's model (as its overrides describe it, unmatched)
in `match_baseline.json`; every job, in whichever process, reads that file
(`with_baseline`) and puts the number in its config. Jobs only read it, and it is
complete before the first starts: no job depends on another's timing.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from ..artifacts.atomic import write_atomic
from ..errors import ConfigError, closest
from .compose import compose, presets
from .scale import apply_scale
from .usage import readers

if TYPE_CHECKING:
    from .spec import ModelSpec

#: model.match -> the card's key for that figure. The KV cache is the card's full-context
#: figure (bfloat16 at model.max_seq_len: a sliding window caps it), FLOPs are at
#: model.max_seq_len tokens of context: the card's defaults.
FIGURES = {"params": "params_total", "active_params": "params_active", "flops_per_token": "flops_per_token",
           "kv_cache_bytes": "kv_cache_bytes_full_context"}
DIMENSIONS = ("ffn_dim", "d_model", "n_layers", "n_experts")
BASELINE = "baseline"
#: The file in a sweep folder that holds the figures of the sweep's first job.
BASELINE_FILE = "match_baseline.json"
#: The step of a width where no plugin asks for more (a multiple of 8 suits every kernel).
WIDTH_STEP = 8
#: Head widths tried, smallest first, for the step the chosen plugins accept (d_model).
HEAD_STEPS = (1, 2, 4, 8, 16, 32, 64)
#: A bracketing search halves its interval at least every other probe: this bounds it
#: far beyond log2 of any dimension's range.
MAX_PROBES = 200
#: The match keys switched off (key, default): a config that matches nothing.
MATCH_OFF = (("match", None), ("match_target", None), ("match_by", "ffn_dim"), ("match_multiple", None))
NOT_A_SWEEP = "means the first job of a sweep (llmarch -m ...); this run is not one"


@dataclass(frozen=True)
class Match:
    """What matching did: shown on the card and recorded in each run's summary."""

    figure: str  # model.match
    by: str  # the dimension that moved
    value: int  # its value now
    multiple: int  # the step it moved in
    target: float  # the figure asked for
    target_from: Optional[str]  # the preset whose figure the target is; None for a number
    achieved: float  # the card's figure at `value`

    @property
    def difference_pct(self) -> float:
        """How far the figure stays from the target, in percent of the target."""
        return 100.0 * (self.achieved - self.target) / self.target

    def record(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "card_key": FIGURES[self.figure],
                "difference_pct": self.difference_pct}

    def describe(self) -> str:
        source = f" ({self.target_from})" if self.target_from else ""
        return (f"{self.figure} {self.achieved:,.0f} for a target of {self.target:,.0f}{source} "
                f"({self.difference_pct:+.3f}%), by {self.by}={self.value} (a multiple of {self.multiple})")


Resolve = Callable[[DictConfig], "ModelSpec"]


def figure_of(spec: "ModelSpec", figure: str) -> float:
    """The card's figure `figure` of `spec`, built on meta."""
    from ..model.card import architecture_card  # the card builds models: config/ sits below model/

    return architecture_card(spec)[FIGURES[figure]]


# ----------------------------------------------------------------------- the keys


def check_keys(model: Any) -> None:
    """The four keys, typed and within range; each one set is used or refused."""
    if model.match is None:
        for key, default in MATCH_OFF[1:]:
            if getattr(model, key) != default:
                raise ConfigError(f"model.{key}", getattr(model, key), "model.match is null, so nothing is matched",
                                  [f"model.match={f}" for f in FIGURES])
        return
    if model.match not in FIGURES:
        raise ConfigError("model.match", model.match, "unknown figure to match", [*FIGURES, "null"])
    if model.match_by not in DIMENSIONS:
        raise ConfigError("model.match_by", model.match_by, "unknown dimension to move", DIMENSIONS)
    if model.match_multiple is not None and model.match_multiple < 1:
        raise ConfigError("model.match_multiple", model.match_multiple, "must be positive",
                          "an integer >= 1, or null for the dimension's own step")
    target = model.match_target
    if target is None:
        raise ConfigError("model.match_target", None, f"model.match={model.match} needs a target",
                          "a number, a preset name, or baseline (the first job of a sweep)")
    if isinstance(target, bool) or not isinstance(target, (int, float, str)):
        raise ConfigError("model.match_target", target, "is neither a number nor a name",
                          "a number, a preset name, or baseline")
    if isinstance(target, (int, float)) and not (math.isfinite(target) and target > 0):
        raise ConfigError("model.match_target", target, "a budget is a positive number", "a number > 0")
    if target == BASELINE:  # the sweep puts its number here (with_baseline): in a spec, it is not a sweep
        raise ConfigError("model.match_target", target, NOT_A_SWEEP, "a number or a preset name")


# ----------------------------------------------------------------------- the target


@functools.lru_cache(maxsize=64)
def _preset_figure(name: str, figure: str, scale_yaml: str) -> float:
    from .spec import resolve_spec  # spec.py matches through this module

    try:
        cfg = compose([f"model={name}"])
    except ConfigError as exc:  # no such preset, or `hf` (a checkpoint folder's placeholder)
        names = presets()
        why = "is neither a number nor a preset" + (f" ({exc})" if exc.key != "model" else "")
        raise ConfigError("model.match_target", name, why, closest(name, names) or names) from None
    with open_dict(cfg):
        cfg.scale = OmegaConf.create(scale_yaml)
    return figure_of(resolve_spec(cfg), figure)


def target_figure(cfg: DictConfig, model: Any) -> float:
    """The target as a number: a preset's figure is computed at the run's `scale`."""
    target = model.match_target
    if isinstance(target, str):
        return _preset_figure(target, model.match, OmegaConf.to_yaml(cfg.get("scale") or {}, resolve=True))
    return target


# ----------------------------------------------------------------------- the dimension


def _head_step(spec: "ModelSpec") -> int:
    """The smallest head width step every chosen plugin accepts (rotary dimensions are
    even; rope_2d rotates quarters), asked of their own `validate` hooks."""
    m = spec.model
    params = [*spec.params.items(), *((g, p) for changes in spec.layer_params.values() for g, p in changes.items())]
    for step in HEAD_STEPS:
        try:
            for head in (step, 2 * step, 3 * step):
                model = dataclasses.replace(m, head_dim=head, d_model=head * m.n_heads)
                for group, p in params:
                    p.validate(model, group)
        except ConfigError:
            continue
        return step
    raise ConfigError("model.match_by", "d_model", f"no head width of up to {3 * HEAD_STEPS[-1]} suits the chosen "
                      "plugins", "another dimension, or set model.head_dim")


def step_and_low(spec: "ModelSpec", by: str, multiple: Optional[int], head_derived: bool) -> tuple[int, int]:
    """The step `by` moves in and its smallest allowed value. A step the plugins cannot
    take (a d_model that leaves head_dim a fraction, or one no rotary part accepts) is
    refused, naming the key."""
    m = spec.model
    if by == "d_model" and head_derived:  # head_dim = d_model / n_heads moves with it
        heads = _head_step(spec)
        need = heads * m.n_heads
        if multiple is not None and multiple % need:
            raise ConfigError("model.match_multiple", multiple, f"d_model moves in steps of n_heads x {heads} = "
                              f"{need} (head_dim = d_model / n_heads, in steps of {heads} for the chosen plugins)",
                              f"a multiple of {need}")
        step = multiple or math.lcm(WIDTH_STEP, need)
        return step, step
    if by == "n_experts":
        groups = m.n_expert_groups
        if multiple is not None and multiple % groups:
            raise ConfigError("model.match_multiple", multiple, f"the experts are routed in "
                              f"model.n_expert_groups={groups} groups", f"a multiple of {groups}")
        step = multiple or groups
        fewest = math.ceil(m.experts_per_token * groups / m.topk_expert_groups)  # top-k from the chosen groups
        return step, step * math.ceil(fewest / step)
    step = multiple or (1 if by == "n_layers" else WIDTH_STEP)
    return step, step


def dimensions_read(cfg: DictConfig) -> list[str]:
    """The dimensions the chosen plugins (or the core) read: n_experts on a dense model is not."""
    read = readers(cfg)
    return [d for d in DIMENSIONS if d in read]


# ----------------------------------------------------------------------- the search


class OutOfReach(Exception):
    """The target lies below the figure of the smallest allowed value, or above the largest's."""

    def __init__(self, side: str, k: int, figure: float):
        super().__init__(side, k, figure)
        self.side, self.k, self.figure = side, k, figure


def closest_multiple(figure_at: Callable[[int], float], target: float, low: int, high: int, start: int,
                     on_flat: Callable[[int, int, float], None]) -> tuple[int, float]:
    """The k in low..high whose figure_at(k) (non-decreasing in k) is closest to
    `target`, the smaller k on a tie, with its figure. Raises OutOfReach where even `low`
    gives more, or `high` less, than `target`; calls `on_flat(k1, k2, figure)` where the
    first two k probed give the same figure (the figure does not depend on k)."""
    seen: dict[int, float] = {}
    a, b = low, high  # the first k whose figure reaches the target lies in a..b
    reached = False  # whether figure(b) >= target was seen
    k = min(max(start, low), high)
    slow = 0  # probes in a row that did not halve the bracket
    for _ in range(MAX_PROBES):
        width = b - a
        seen[k] = figure_at(k)
        if seen[k] >= target:
            b, reached = k, True
        else:
            a = k + 1
        if len(seen) == 2:
            (k1, f1), (k2, f2) = sorted(seen.items())
            if f1 == f2:
                on_flat(k1, k2, f1)
        if a > b:
            raise OutOfReach("above", high, seen[high])
        if a == b and reached:
            break
        # Without a figure above the target the bracket is open, and its width says nothing.
        slow = slow + 1 if reached and b - a > width // 2 else 0
        last = b - 1 if reached else b  # the largest k still worth a probe
        if len(seen) == 1:  # a neighbour, for the slope
            guess: Optional[float] = k + 1 if seen[k] < target else k - 1
        else:
            guess = None if slow >= 2 else _interpolate(seen, target)
        if guess is not None and math.isfinite(guess):
            k = min(max(math.floor(guess), a), last)
        elif reached:
            k = (a + b) // 2
        else:  # no figure above the target yet: double the largest probed
            k = min(max(2 * (a - 1), a), last)
    else:
        raise RuntimeError(f"matching did not converge in {MAX_PROBES} probes: {sorted(seen.items())[:8]} ...")
    first = a  # the smallest k whose figure reaches the target
    if first == low:
        if seen[low] > target:
            raise OutOfReach("below", low, seen[low])
        return low, seen[low]
    below = seen[first - 1]  # probed: that is how the bracket came to start at `first`
    if target - below <= seen[first] - target:
        return first - 1, below
    return first, seen[first]


def _interpolate(seen: dict[int, float], target: float) -> Optional[float]:
    """Where a line (two points) or parabola (the three nearest the target, by figure)
    through the figures seen meets `target`; None where it does not."""
    points = sorted(seen.items(), key=lambda kv: abs(kv[1] - target))[:3]
    if len(points) < 2:
        return None
    if len(points) == 3:
        (x0, y0), (x1, y1), (x2, y2) = points
        # Newton's form: y0 + d1 (x - x0) + d2 (x - x0)(x - x1)
        if len({x0, x1, x2}) == 3:
            d01, d12 = (y1 - y0) / (x1 - x0), (y2 - y1) / (x2 - x1)
            d2 = (d12 - d01) / (x2 - x0)
            if d2 != 0:
                # d2 x^2 + (d01 - d2 (x0 + x1)) x + (y0 - d01 x0 + d2 x0 x1 - target) = 0
                qa, qb = d2, d01 - d2 * (x0 + x1)
                qc = y0 - d01 * x0 + d2 * x0 * x1 - target
                disc = qb * qb - 4 * qa * qc
                if disc >= 0:
                    roots = [(-qb + s * math.sqrt(disc)) / (2 * qa) for s in (1, -1)]
                    return min(roots, key=lambda r: abs(r - x0))
    (x0, y0), (x1, y1) = sorted(points[:2])
    if y1 == y0:
        return None
    return x0 + (target - y0) * (x1 - x0) / (y1 - y0)


# ----------------------------------------------------------------------- matching


def matched_spec(cfg: DictConfig, scaled: DictConfig, spec: "ModelSpec", resolve: Resolve) -> "ModelSpec":
    """`spec` (resolved from `scaled`, the config at its scale) with `model.match_by` set
    so that the card's `model.match` figure is closest to `model.match_target`; `cfg` is
    the config as given (its `scale` prices a preset target). `resolve` turns a scaled
    config into a spec, unmatched."""
    from .spec import MAX_SIZES

    m = spec.model
    figure, by = m.match, m.match_by
    movable = dimensions_read(cfg)
    if by not in movable:
        raise ConfigError("model.match_by", by, f"no chosen plugin reads model.{by}, so it cannot move "
                          f"model.match={figure}", movable)
    target = target_figure(cfg, m)
    step, low = step_and_low(spec, by, m.match_multiple, scaled.model.get("head_dim") is None)
    specs: dict[int, "ModelSpec"] = {}

    def figure_at(k: int) -> float:
        value = k * step
        if value == getattr(m, by):
            specs[k] = spec
        else:
            candidate = scaled.copy()
            with open_dict(candidate):
                candidate.model[by] = value
            try:
                specs[k] = resolve(candidate)
            except ConfigError as exc:
                raise ConfigError("model.match_by", by, f"matching {figure} reached model.{by}={value}, which is "
                                  f"refused: {exc}", "another target, dimension or model.match_multiple") from None
        return figure_of(specs[k], figure)

    def flat(k1: int, k2: int, value: float) -> None:
        raise ConfigError("model.match_by", by, f"the {figure} figure is {value:,.0f} at both {by}={k1 * step} and "
                          f"{by}={k2 * step}: with the chosen plugins it does not depend on {by}",
                          [d for d in movable if d != by])

    try:
        k, achieved = closest_multiple(figure_at, target, low // step, MAX_SIZES[by] // step,
                                       round(getattr(m, by) / step), flat)
    except OutOfReach as out:
        below = out.side == "below"
        raise ConfigError("model.match_target", m.match_target,
                          f"the {'smallest' if below else 'largest'} allowed {by}={out.k * step} gives {figure} "
                          f"{out.figure:,.0f}, {'above' if below else 'below'} the target {target:,.0f}",
                          f"a target {'>=' if below else '<='} {out.figure:,.0f}, or another model.match_by") from None
    result = Match(figure=figure, by=by, value=k * step, multiple=step, target=target,
                   target_from=m.match_target if isinstance(m.match_target, str) else None, achieved=achieved)
    return dataclasses.replace(specs[k], match=result)


def _match_off(cfg: DictConfig) -> None:
    with open_dict(cfg):
        for key, default in MATCH_OFF:
            cfg.model[key] = default


def settled(cfg: DictConfig, spec: "ModelSpec") -> DictConfig:
    """The config in effect for `spec`: at its scale, with the matched dimension written in
    and matching off, so that it resolves to the same model anywhere (the config a
    checkpoint saves resolves its interpolations, which would keep the unmatched width).
    `cfg` itself where nothing was matched."""
    if spec.match is None:
        return cfg
    out = apply_scale(cfg).copy()
    _match_off(out)
    with open_dict(out):
        out.model[spec.match.by] = spec.match.value
    return out


# ----------------------------------------------------------------------- baseline


def needs_baseline(jobs: list[list[str]], config: DictConfig) -> bool:
    """Whether a sweep's jobs ask for the first job's figures."""
    if OmegaConf.select(config, "model.match_target", default=None) == BASELINE:
        return True
    for job in jobs:
        for text in job:
            key, _, value = text.lstrip("+~").partition("=")
            if key == "model.match_target" and value.strip() == BASELINE:
                return True
    return False


def baseline_figures(cfg: DictConfig) -> dict[str, float]:
    """Every matchable figure of the model `cfg` describes, matching off."""
    from ..model.card import architecture_card
    from .spec import resolve_spec

    plain = cfg.copy()
    _match_off(plain)
    card = architecture_card(resolve_spec(plain))
    return {figure: card[key] for figure, key in FIGURES.items()}


def write_baseline(sweep_dir: Path, job: list[str], job_cfg: Optional[DictConfig],
                   error: Optional[str] = None) -> None:
    """Record the sweep's first job (its overrides and figures, or why it has none) in
    `match_baseline.json`, written whole before any job starts."""
    record: dict[str, Any] = {"job": 0, "overrides": list(job)}
    if error is None and job_cfg is not None:
        try:
            record["figures"] = baseline_figures(job_cfg)
        except ConfigError as exc:
            error = str(exc)
    if error is not None:
        record["error"] = error
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(sweep_dir / BASELINE_FILE, json.dumps(record, indent=1) + "\n")


def with_baseline(cfg: DictConfig, sweep_dir: Optional[Path]) -> DictConfig:
    """`cfg` with `model.match_target=baseline` replaced by the figure the sweep recorded
    for its first job (`sweep_dir`: the sweep folder, None outside a sweep)."""
    model = cfg.get("model")
    if model is None or model.get("match_target") != BASELINE or model.get("match") is None:
        return cfg
    if sweep_dir is None:
        raise ConfigError("model.match_target", BASELINE, NOT_A_SWEEP, "a number or a preset name")
    path = sweep_dir / BASELINE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError("model.match_target", BASELINE, f"this sweep recorded no baseline ({path}): only Hydra's "
                          "basic sweeper knows its first job when it starts", "a number or a preset name") from None
    if "figures" not in record:
        raise ConfigError("model.match_target", BASELINE, f"the sweep's first job ({' '.join(record['overrides'])}) "
                          f"gives no baseline: {record.get('error')}", "a first job that builds")
    figure = model.get("match")
    if figure not in record["figures"]:
        raise ConfigError("model.match", figure, "unknown figure to match", [*FIGURES, "null"])
    out = cfg.copy()
    with open_dict(out):
        out.model.match_target = record["figures"][figure]
    return out
