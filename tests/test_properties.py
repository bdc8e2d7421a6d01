"""Property tests over the config space (hypothesis, a bounded number of examples).

- Every combination of valid group choices and small numbers either builds, runs
  forward and backward with finite loss and gradients (and, in the slow tier,
  compiles fullgraph and matches eager), or is refused with a ConfigError naming a
  key; never any other exception.
- A random bad value for any number or switch of the model schema, or for any of
  the training hyper-parameters, is a ConfigError naming exactly that key.

The examples are derandomized, so a run in CI is reproducible; `--hypothesis-seed`
explores others.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import llmarch_compose as lc
from llmarch_compose.config.compose import CONFIG_MODULE, VERSION_BASE, presets
from llmarch_compose.config.schema import ModelConfig
from llmarch_compose.config.spec import MAX_SIZES, TOKEN_FIELDS, TOKEN_RANGE, resolve_spec
from llmarch_compose.config.structured import to_dataclass
from llmarch_compose.errors import ConfigError
from llmarch_compose.plugin import registry as plugins
from llmarch_compose.testing import loss_of
from llmarch_compose.train.data import data_config, make_source
from llmarch_compose.train.loop import MAX_COUNT, TrainSettings, check

VOCAB = 64
COMBO_EXAMPLES = 30
BAD_VALUE_EXAMPLES = 40


def group_options() -> dict[str, list[str]]:
    plugins.discover()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
        loader = GlobalHydra.instance().config_loader()
        options = {g: sorted(loader.get_group_options(g)) for g in plugins.GROUPS}
    GlobalHydra.instance().clear()
    return options


OPTIONS = group_options()
#: The top-level keys an error may name: the composed config's, or a layer rule's.
ROOTS = {f.name for f in dataclasses.fields(lc.config.schema.RootConfig)} | {"overrides"}

choices = st.fixed_dictionaries({group: st.sampled_from(names) for group, names in OPTIONS.items()})
numbers = st.fixed_dictionaries({
    "d_model": st.sampled_from([16, 24, 32, 48]),
    "n_heads": st.sampled_from([1, 2, 3, 4]),
    "n_kv_heads": st.sampled_from([1, 2, 4]),
    "n_layers": st.integers(1, 2),
    "ffn_dim": st.sampled_from([8, 24, 40]),
    "max_seq_len": st.sampled_from([16, 32]),
})
PROPERTY = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def overrides_of(groups: dict[str, str], nums: dict[str, int]) -> list[str]:
    return [*(f"{g}={c}" for g, c in groups.items()), *(f"model.{k}={v}" for k, v in nums.items()),
            f"model.vocab_size={VOCAB}"]


def build_or_refuse(overrides: list[str]):
    """The model `overrides` describe, or None after checking the refusal names a key."""
    try:
        return lc.build(lc.compose(overrides))
    except ConfigError as exc:
        root = exc.key.split(".")[0].split("[")[0]
        assert exc.key and root in ROOTS, f"{overrides}: a ConfigError must name a key, got {exc.key!r}: {exc}"
        event(f"refused: {exc.key}: {exc}"[:150])
        return None


def train_step(model, seq: int = 8):
    vocab = model.spec.model.vocab_size
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (2, seq), generator=g)
    targets = torch.randint(0, vocab, (2, seq), generator=g)
    out = model(x)
    loss = loss_of(out, targets)
    loss.backward()
    return out, loss


def assert_trains(model, overrides: list[str], seq: int = 8) -> None:
    """One step gives a finite loss and finite gradients."""
    event("built")
    _, loss = train_step(model, seq)
    assert math.isfinite(loss.item()), overrides
    for name, p in model.named_parameters():
        assert p.grad is None or bool(torch.isfinite(p.grad).all()), f"{overrides}: {name}"


@pytest.mark.slow  # each example trains a step
@settings(PROPERTY, max_examples=COMBO_EXAMPLES)
@given(groups=choices, nums=numbers)
def test_every_combination_builds_and_trains_or_names_a_key(groups, nums):
    overrides = overrides_of(groups, nums)
    torch.manual_seed(0)
    model = build_or_refuse(overrides)
    if model is not None:
        assert_trains(model, overrides, seq=min(8, nums["max_seq_len"]))


PRESET_EXAMPLES = 20
#: Any preset at scale=tiny with some of its groups swapped for other choices (a hybrid).
swaps = st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=3).flatmap(
    lambda chosen: st.fixed_dictionaries({g: st.sampled_from(OPTIONS[g]) for g in chosen}))


@pytest.mark.slow  # each example trains a step
@settings(PROPERTY, max_examples=PRESET_EXAMPLES)
@given(preset=st.sampled_from(presets()), groups=swaps)
def test_every_preset_with_swapped_groups_builds_and_trains_or_names_a_key(preset, groups):
    overrides = [f"model={preset}", "scale=tiny", *(f"{g}={c}" for g, c in groups.items())]
    torch.manual_seed(0)
    model = build_or_refuse(overrides)
    if model is not None:
        assert_trains(model, overrides)


@pytest.mark.slow
@settings(PROPERTY, max_examples=8)
@given(groups=choices, nums=numbers)
def test_every_combination_compiles_fullgraph_like_eager(groups, nums):
    overrides = overrides_of(groups, nums)
    torch.manual_seed(0)
    model = build_or_refuse(overrides)
    if model is None:
        return
    torch._dynamo.reset()
    eager = copy.deepcopy(model)
    compiled = lc.compile(model, mode="default")
    seq = min(8, nums["max_seq_len"])
    out_c, loss_c = train_step(compiled, seq)
    out_e, loss_e = train_step(eager, seq)
    torch.testing.assert_close(out_c.logits, out_e.logits, atol=1e-5, rtol=1e-5, msg=lambda m: f"{overrides}: {m}")
    for (name, a), b in zip(model.named_parameters(), eager.parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{overrides} {name}: {m}")


# ------------------------------------------------------------------ bad values name their key

#: A model that reads every number: MoE feed-forward, MLA attention (its dims), a window.
READS_ALL = {"attention": ["attention=mla"], "ffn": ["ffn=moe"], "window": ["attention=swa"]}
SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64",
         f"model.vocab_size={VOCAB}", "model.max_seq_len=32"]
#: Fields that hold text or structures (their checks are tested in test_config*.py).
NOT_NUMBERS = ("name", "path", "layer_pattern", "rope_scaling")


def _kind(f: dataclasses.Field) -> str:
    return str(f.type).replace("Optional[", "").rstrip("]")


MODEL_FIELDS = [f for f in dataclasses.fields(ModelConfig) if f.name not in NOT_NUMBERS]


def bad_values(f: dataclasses.Field):
    """Values no reading of field `f` accepts."""
    kind = _kind(f)
    junk = st.sampled_from(["abc", "[1,2]", "{a:1}"])
    if kind == "bool":
        return st.one_of(st.integers(-10**6, 10**6).filter(lambda v: v not in (0, 1)), st.just("maybe"), junk)
    if f.name in TOKEN_FIELDS:
        low, high = TOKEN_RANGE
        # eos_token_id may be a list of ids (GLM-4 stops at any of three): a list is junk only with a bad id.
        junk = st.sampled_from(["abc", "{a:1}", f"[1,{low - 1}]", "[1,abc]"])
        return st.one_of(st.integers(-10**12, low - 1), st.integers(high + 1, 10**15), st.just(1.5), junk)
    non_finite = st.sampled_from(["nan", "inf", "-inf"])
    negative = st.integers(-10**9, -1)
    if kind == "int":
        beyond = st.integers(MAX_SIZES[f.name] + 1, 10**21)
        return st.one_of(negative, beyond, non_finite, st.just(2.5), junk)
    return st.one_of(negative, st.floats(-1e30, -1e-6), st.just("1e39"), non_finite, junk)


def compose_with(field: str, value) -> list[str]:
    extra = READS_ALL["window"] if field == "window" else READS_ALL["attention"] + READS_ALL["ffn"]
    return [*SMALL, *extra, f"model.{field}={value}"]


@pytest.mark.parametrize("field", [f.name for f in MODEL_FIELDS])
def test_every_model_integer_has_an_upper_bound(field):
    f = next(f for f in MODEL_FIELDS if f.name == field)
    if _kind(f) == "int" and field not in TOKEN_FIELDS:
        assert field in MAX_SIZES, f"model.{field} has no bound in config/spec.py:MAX_SIZES"


@pytest.mark.slow  # a composition per example
@settings(PROPERTY, max_examples=BAD_VALUE_EXAMPLES)
@given(data=st.data())
def test_a_bad_model_value_is_a_config_error_naming_its_key(data):
    f = data.draw(st.sampled_from(MODEL_FIELDS), label="field")
    value = data.draw(bad_values(f), label="value")
    overrides = compose_with(f.name, value)
    with pytest.raises(ConfigError) as info:
        resolve_spec(lc.compose(overrides))
    assert info.value.key == f"model.{f.name}", f"{overrides}: named {info.value.key}: {info.value}"
    assert len(str(info.value)) < 1000


TRAIN_BAD = {
    "lr": st.one_of(st.floats(max_value=0.0), st.sampled_from(["nan", "inf"])),
    "grad_clip": st.one_of(st.floats(max_value=0.0), st.just("nan")),
    "weight_decay": st.one_of(st.floats(max_value=-1e-9), st.sampled_from(["nan", "inf"])),
    "warmup_steps": st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_COUNT + 1)),
    "min_lr_ratio": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0001, max_value=1e9), st.just("nan")),
    "beta1": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0, max_value=1e9), st.just("nan")),
    "beta2": st.one_of(st.floats(max_value=-1e-9), st.floats(min_value=1.0, max_value=1e9), st.just("nan")),
    "steps": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_COUNT + 1)),
    "batch_size": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_COUNT + 1)),
    "eval_every": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_COUNT + 1)),
    "eval_batches": st.one_of(st.integers(max_value=0), st.integers(min_value=MAX_COUNT + 1)),
    "on_nonfinite": st.sampled_from(["ignore", "retry", ""]),
}


@pytest.mark.slow  # a composition per example
@settings(PROPERTY, max_examples=BAD_VALUE_EXAMPLES)
@given(data=st.data())
def test_a_bad_training_value_is_a_config_error_naming_its_key(data):
    key = data.draw(st.sampled_from(sorted(TRAIN_BAD)), label="key")
    value = data.draw(TRAIN_BAD[key], label="value")
    value = "nan" if isinstance(value, float) and math.isnan(value) else value
    cfg = lc.compose([*SMALL, "task=train", f"task.{key}={value}"])
    with pytest.raises(ConfigError) as info:
        task = to_dataclass(TrainSettings, cfg.task, "task")
        spec = resolve_spec(cfg)
        objective = plugins.get("topology", spec.params["topology"].plugin).cls.objective
        source = make_source(data_config(cfg.data), objective, spec.params["topology"].name)
        task.seq_len = task.seq_len or source.natural_seq_len or spec.model.max_seq_len
        check(task, spec.model.vocab_size, spec.model.max_seq_len, source, cfg.data.name)
    assert info.value.key == f"task.{key}", f"task.{key}={value}: named {info.value.key}: {info.value}"
