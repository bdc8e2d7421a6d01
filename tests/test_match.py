"""Equal budgets (`model.match`): one dimension is set, before anything is built, to the
allowed value whose architecture-card figure is closest to the target.

Every match is checked against the card itself: the chosen value's figure, and its two
neighbours' (one multiple either side), computed without matching. The search is
checked against brute force on figures of every shape.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import random

import pytest
from omegaconf import open_dict

import llmarch_compose as lc
from llmarch_compose.artifacts.checkpoint import load_checkpoint
from llmarch_compose.config import match
from llmarch_compose.config.match import OutOfReach, closest_multiple
from llmarch_compose.config.scale import apply_scale
from llmarch_compose.config.spec import resolve_spec
from llmarch_compose.errors import ConfigError
from llmarch_compose.model.build import build
from llmarch_compose.model.card import architecture_card, count_params
from llmarch_compose.tasks import run_task

# ------------------------------------------------------------------ the search, on plain numbers


def brute_force(values: list[float], target: float) -> int:
    """The index closest to `target`, the smaller on a tie."""
    return min(range(len(values)), key=lambda k: (abs(values[k] - target), k))


def search(values: list[float], target: float, start: int) -> tuple[int, int]:
    """closest_multiple over `values` (k = 0..len-1): (k, probes)."""
    probes = []

    def figure_at(k: int) -> float:
        probes.append(k)
        return values[k]

    def flat(*args):
        raise AssertionError(f"not flat: {args}")

    k, figure = closest_multiple(figure_at, target, 0, len(values) - 1, start, flat)
    assert figure == values[k]
    assert len(probes) == len(set(probes)), probes  # no figure is computed twice
    return k, len(probes)


def test_the_search_finds_what_brute_force_finds():
    rng = random.Random(0)
    shapes = {
        "affine": lambda k: 1000 + 37 * k,
        "quadratic": lambda k: 5 + 3 * k + 2 * k * k,
        "steps": lambda k: 100 * k + (50 if k % 3 == 0 else 0) + k // 7 * 400,  # a layer pattern's jumps
    }
    for name, shape in shapes.items():
        values = [shape(k) for k in range(300)]
        assert all(b > a for a, b in zip(values, values[1:])), name
        targets = [values[0], values[-1], *values[1:-1:37],  # figures that are met exactly
                   *(rng.uniform(values[0], values[-1]) for _ in range(40)),
                   *((a + b) / 2 for a, b in zip(values[10::53], values[11::53]))]  # ties: the smaller wins
        for target in targets:
            for start in (0, 150, 299):
                k, _ = search(values, target, start)
                assert k == brute_force(values, target), (name, target, start)


def test_random_figures_match_brute_force():
    rng = random.Random(1)
    for _ in range(200):
        steps = [rng.choice([1, 2, 5, 40, 1000]) for _ in range(rng.randint(2, 120))]
        values = [sum(steps[:i + 1]) for i in range(len(steps))]
        target = rng.uniform(values[0], values[-1])
        k, _ = search(values, target, rng.randrange(len(values)))
        assert k == brute_force(values, target)


def test_a_polynomial_figure_takes_a_handful_of_probes_over_a_wide_range():
    affine = [float(7_000_000 + 3 * 4096 * 8 * k) for k in range(1 << 17)]
    quadratic = [float(12 * k * k * 64 + 1_000_000 * k) for k in range(1 << 14)]
    for values, target, start in ((affine, 6.9e9, 1792), (quadratic, 6.7e9, 64), (affine, 9e7, 100_000)):
        k, probes = search(values, target, start)
        assert k == brute_force(values, target)
        assert probes <= 6, probes


def test_a_target_out_of_reach_raises_with_the_bound():
    values = [10.0, 20.0, 30.0]
    with pytest.raises(OutOfReach) as below:
        search(values, 9.0, 1)
    assert (below.value.side, below.value.k, below.value.figure) == ("below", 0, 10.0)
    with pytest.raises(OutOfReach) as above:
        search(values, 31.0, 1)
    assert (above.value.side, above.value.k, above.value.figure) == ("above", 2, 30.0)
    assert search(values, 10.0, 2)[0] == 0 and search(values, 30.0, 0)[0] == 2  # the ends themselves are met


# ------------------------------------------------------------------ matching, against the card


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    return lc.compose(list(overrides))


def composed(*overrides: str, **model):
    """The composed config (each composition once per module), with `model.` keys set;
    the defaults (`model=tiny`, `scale=full`) are left out, so that they compose once."""
    overrides = tuple(o for o in overrides if o not in ("model=tiny", "scale=full"))
    cfg = _composed(overrides).copy()
    with open_dict(cfg):
        for key, value in model.items():
            cfg.model[key] = value
    return cfg


def at_value(cfg, by: str, value: int):
    """The spec of `cfg` at its scale with model.<by>=value, nothing matched."""
    plain = apply_scale(cfg).copy()
    with open_dict(plain):
        plain.model[by] = value
        plain.model.match = None
        plain.model.match_target = None
        plain.model.match_by = "ffn_dim"
        plain.model.match_multiple = None
    return resolve_spec(plain)


def check_closest(cfg, expected_target: float) -> match.Match:
    """Match, then check the chosen value against the card at it and at its neighbours."""
    spec = resolve_spec(cfg)
    result = spec.match
    m = result.multiple
    key = match.FIGURES[result.figure]
    assert result.target == pytest.approx(expected_target, rel=1e-12)
    assert result.value % m == 0 and getattr(spec.model, result.by) == result.value
    card = architecture_card(spec)
    assert card[key] == result.achieved and card["match"] == result.record()
    if result.figure == "params":  # the model built from the spec has them
        assert count_params(build(spec, device="meta"))["params_total"] == result.achieved
    assert architecture_card(at_value(cfg, result.by, result.value))[key] == result.achieved
    miss = abs(result.achieved - result.target)
    up = architecture_card(at_value(cfg, result.by, result.value + m))[key]
    assert abs(up - result.target) >= miss, (result, up)
    if result.value > m:
        try:
            down = architecture_card(at_value(cfg, result.by, result.value - m))[key]
        except ConfigError:  # fewer experts than a token is routed to: no neighbour below
            if result.by != "n_experts":
                raise
            down = None
        if down is not None:
            assert abs(down - result.target) > miss, (result, down)  # strictly: a tie goes to the smaller
    assert result.difference_pct == pytest.approx(100 * (result.achieved - result.target) / result.target)
    return result


def figure_of_preset(preset: str, figure: str, scale: str) -> float:
    return architecture_card(resolve_spec(composed(f"model={preset}", f"scale={scale}")))[match.FIGURES[figure]]


def slow(*case):
    return pytest.param(*case, marks=pytest.mark.slow)


CASES = [  # (preset, scale, figure, by, target); the fast tier keeps the cheapest
    ("tiny", "full", "params", "ffn_dim", 2_000_000),
    slow("llama3_8b", "tiny", "params", "ffn_dim", "qwen2_7b"),  # a preset's figure at the same scale
    slow("mistral_7b", "tiny", "flops_per_token", "n_layers", 3_000_000),
    slow("mixtral_8x7b", "tiny", "params", "n_experts", "llama2_7b"),
    slow("tiny", "full", "params", "d_model", 5_000_000),  # head_dim = d_model / 8 moves with it
    slow("mistral_7b", "tiny", "kv_cache_bytes", "n_layers", 100_000),
    slow("mixtral_8x7b", "tiny", "active_params", "d_model", "gpt2"),
    slow("t5_small", "tiny", "params", "d_model", "bart_base"),  # both stacks of an encoder-decoder
    slow("deepseek_v3", "tiny", "active_params", "n_layers", 900_000),  # dense, then MoE layers: not affine
    slow("gpt2", "tiny", "flops_per_token", "ffn_dim", "bert_base"),
]


@pytest.mark.parametrize("preset,scale,figure,by,target", CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_the_match_is_the_closest_value_on_the_card(preset, scale, figure, by, target):
    expected = figure_of_preset(target, figure, scale) if isinstance(target, str) else target
    cfg = composed(f"model={preset}", f"scale={scale}", match=figure, match_by=by, match_target=target)
    result = check_closest(cfg, expected)
    assert (result.figure, result.by) == (figure, by)
    assert result.target_from == (target if isinstance(target, str) else None)


@pytest.mark.parametrize("fraction,step", [(0.5, 4), slow(1.0, 2), slow(0.25, 8)])
def test_d_model_moves_in_head_widths_the_rotary_part_accepts(fraction, step):
    # tiny: 8 heads, head_dim = d_model / 8; the rotary part head_dim * fraction must be even
    cfg = composed(match="params", match_by="d_model", match_target=5_000_000, rotary_fraction=fraction)
    result = check_closest(cfg, 5_000_000)
    assert result.multiple == 8 * step  # 8 heads x the head width step
    assert (result.value // 8 * fraction) % 2 == 0


@pytest.mark.slow
def test_a_match_multiple_is_the_step():
    result = check_closest(composed(match="params", match_target=2_000_000, match_multiple=64), 2_000_000)
    assert result.multiple == 64 and result.value % 64 == 0


def test_matching_the_figure_a_model_has_keeps_it():
    params = architecture_card(resolve_spec(composed()))["params_total"]
    spec = resolve_spec(composed(match="params", match_target=params))
    assert spec.model.ffn_dim == 704 and spec.match.achieved == params and spec.match.difference_pct == 0
    assert resolve_spec(composed()).match is None


def test_the_settled_config_resolves_to_the_matched_model_as_a_checkpoint_saves_it():
    from omegaconf import OmegaConf

    cfg = composed(match="params", match_target=1_500_000)
    spec = resolve_spec(cfg)
    saved = OmegaConf.create(OmegaConf.to_yaml(match.settled(cfg, spec), resolve=True))  # as save_checkpoint
    again = resolve_spec(saved)
    assert again.match is None and again.model.ffn_dim == spec.match.value != 704
    assert again.params == spec.params and again.model == dataclasses.replace(
        spec.model, match=None, match_target=None)
    plain = composed()
    assert match.settled(plain, resolve_spec(plain)) is plain  # nothing matched: nothing to write in


@pytest.mark.slow
@pytest.mark.parametrize("by,target", [("ffn_dim", "llama2_7b"), ("d_model", "llama2_7b"), ("n_layers", "llama2_13b")])
def test_a_full_size_preset_matches_a_published_one(by, target):
    """llama3_8b with the parameter count of llama2_7b (6,738,415,616) or llama2_13b
    (13,015,864,320), the published figures: full size, on meta."""
    published = {"llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320}[target]
    result = check_closest(composed("model=llama3_8b", match="params", match_by=by, match_target=target), published)
    assert abs(result.difference_pct) < 1.0


# ------------------------------------------------------------------ refusals, by key


REFUSALS = [  # (preset, model keys, the key named, what the message says)
    ("tiny", dict(match="params", match_by="n_experts", match_target=1e6), "model.match_by",
     "no chosen plugin reads model.n_experts"),
    ("tiny", dict(match="kv_cache_bytes", match_target=1e6), "model.match_by", "does not depend on ffn_dim"),
    ("tiny", dict(match="params", match_target=1000), "model.match_target", "the smallest allowed ffn_dim=8"),
    ("tiny", dict(match="params", match_target=1e13), "model.match_target", "the largest allowed ffn_dim=1048576"),
    ("tiny", dict(match="params", match_target="baseline"), "model.match_target", "the first job of a sweep"),
    ("tiny", dict(match="params", match_target="lama3_8b"), "model.match_target", "llama3_8b"),
    ("tiny", dict(match="params"), "model.match_target", "needs a target"),
    ("tiny", dict(match="params", match_target=-5), "model.match_target", ">= 0"),
    ("tiny", dict(match="params", match_target=[1, 2]), "model.match_target", "neither a number nor a name"),
    ("tiny", dict(match="parameters", match_target=1e6), "model.match", "unknown figure"),
    ("tiny", dict(match="params", match_target=1e6, match_by="width"), "model.match_by", "unknown dimension"),
    ("tiny", dict(match="params", match_target=1e6, match_multiple=0), "model.match_multiple", "positive"),
    ("tiny", dict(match="params", match_target=5e6, match_by="d_model", match_multiple=12), "model.match_multiple",
     "steps of n_heads x 2 = 16"),
    ("tiny", dict(match_target=1e6), "model.match_target", "model.match is null"),
    ("tiny", dict(match_by="d_model"), "model.match_by", "model.match is null"),
    ("tiny", dict(match_multiple=16), "model.match_multiple", "model.match is null"),
    slow("t5_small", dict(match="kv_cache_bytes", match_by="d_model", match_target=1e6), "model.match_by",
         "does not depend on d_model"),  # T5 sets head_dim itself
]


@pytest.mark.parametrize("preset,keys,key,says", REFUSALS, ids=lambda v: v if isinstance(v, str) else None)
def test_a_match_that_cannot_be_met_is_refused_by_name(preset, keys, key, says):
    with pytest.raises(ConfigError) as info:
        resolve_spec(composed(f"model={preset}", **keys))
    assert info.value.key == key, str(info.value)
    assert says in str(info.value)


# ------------------------------------------------------------------ baseline: a sweep's first job


def test_needs_baseline_reads_the_planned_jobs():
    from omegaconf import OmegaConf

    plain = OmegaConf.create({"model": {"match_target": None}})
    assert match.needs_baseline([["attention=mha", "model.match_target=baseline"]], plain)
    assert not match.needs_baseline([["attention=mha", "model.match_target=gpt2"]], plain)
    assert match.needs_baseline([["attention=mha"]], OmegaConf.create({"model": {"match_target": "baseline"}}))


def test_a_job_reads_the_first_jobs_figure_from_the_sweep_folder(tmp_path):
    first = composed()  # tiny: GQA, 2 of 8 heads for keys and values
    match.write_baseline(tmp_path, [], first)
    record = json.loads((tmp_path / match.BASELINE_FILE).read_text())
    card = architecture_card(resolve_spec(first))
    assert record["figures"] == {f: card[key] for f, key in match.FIGURES.items()}
    job = composed("attention=mqa", match="params", match_target="baseline")
    resolved = match.with_baseline(job, tmp_path)
    assert resolved.model.match_target == card["params_total"]
    spec = resolve_spec(resolved)
    # MQA: fewer key/value weights, a wider FFN; one step of ffn_dim is 4 layers x 3 x 256 x 8
    assert spec.model.ffn_dim > 704 and abs(spec.match.achieved - card["params_total"]) <= 4 * 3 * 256 * 8 / 2
    with pytest.raises(ConfigError, match="the first job of a sweep") as info:
        match.with_baseline(job, None)
    assert info.value.key == "model.match_target"
    assert match.with_baseline(composed("attention=mqa"), None).model.match_target is None


def test_a_sweep_without_a_recorded_baseline_is_refused(tmp_path):
    job = composed(match="params", match_target="baseline")
    with pytest.raises(ConfigError, match="recorded no baseline") as info:
        match.with_baseline(job, tmp_path)
    assert info.value.key == "model.match_target"
    match.write_baseline(tmp_path, ["model.d_model=100"], None, "ConfigError: model.n_heads=8: must divide")
    with pytest.raises(ConfigError, match="gives no baseline: ConfigError: model.n_heads=8"):
        match.with_baseline(job, tmp_path)


def test_a_sweep_folder_reused_without_baseline_loses_the_old_record(tmp_path):
    from llmarch_compose.sweep.callback import record_match_baseline

    match.write_baseline(tmp_path, [], None, "an earlier sweep's")
    record_match_baseline(tmp_path, composed(), None)  # a sweeper whose jobs are not known at its start
    assert not (tmp_path / match.BASELINE_FILE).exists()


def test_baseline_outside_a_sweep_fails_the_task_by_name():
    cfg = composed("task=summary", match="params", match_target="baseline")
    with pytest.raises(ConfigError, match="the first job of a sweep") as info:
        run_task(cfg)
    assert info.value.key == "model.match_target"


@pytest.mark.slow
def test_a_sweep_matched_to_its_baseline_trains_models_of_equal_size(tmp_path):
    from test_report import TINY_JOB, llmarch, only_sweep

    job = [o for o in TINY_JOB if o != "task.checkpoint=false"] + ["task.checkpoint=true"]
    proc = llmarch(["-m", "attention=mha,gqa,mqa", "model.match=params", "model.match_target=baseline", *job],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = only_sweep(tmp_path)
    baseline = json.loads((sweep / match.BASELINE_FILE).read_text())
    assert baseline["overrides"][0] == "attention=mha"
    summaries = [json.loads((sweep / str(n) / "summary.json").read_text()) for n in range(3)]
    target = baseline["figures"]["params"]
    assert summaries[0]["params_total"] == target  # the first job is the baseline, met exactly
    # ffn_dim moves in steps of 8: 2 layers x 3 matrices x d_model 64 x 8 = 3,072 parameters a step
    step = 2 * 3 * 64 * 8
    widths = []
    for summary, attention in zip(summaries, ("mha", "gqa", "mqa")):
        record = summary["match"]
        assert summary["components"]["attention"] == attention
        assert record["figure"] == "params" and record["by"] == "ffn_dim" and record["target"] == target
        assert record["achieved"] == summary["params_total"]  # the trained model's own count
        assert abs(summary["params_total"] - target) <= step / 2
        assert record["difference_pct"] == pytest.approx(100 * (summary["params_total"] - target) / target)
        widths.append(record["value"])
        _, model = load_checkpoint(summary["checkpoint"])  # outside the sweep: the same model rebuilds
        assert count_params(model)["params_total"] == summary["params_total"]
    assert widths[0] < widths[1] < widths[2]  # fewer KV heads, wider FFN
