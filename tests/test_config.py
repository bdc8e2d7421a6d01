"""Composing configs: presets and group choices, validation errors that name the
key, the value and what is valid, and failing before any tensor exists."""

from __future__ import annotations

import pytest
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import llmarch_compose as lc
from llmarch_compose import ConfigError, UnknownChoiceError
from llmarch_compose.config.spec import resolve_spec

GROUPS = ("position", "norm", "activation", "attention", "ffn", "topology")


# ----------------------------------------------------------------------- compose


def test_compose_returns_the_config():
    cfg = lc.compose()
    assert isinstance(cfg, DictConfig)
    assert "hydra" not in cfg
    for key in (*GROUPS, "model", "task", "data", "compile", "seed", "device"):
        assert key in cfg, key
    # The default: the tiny preset, trained, its group choices as the preset sets them.
    assert cfg.model.name == "tiny" and cfg.task.name == "train"
    assert {g: cfg[g].name for g in GROUPS} == {
        "position": "rope", "norm": "rmsnorm", "activation": "swiglu",
        "attention": "gqa", "ffn": "dense", "topology": "decoder_only"}
    # compose() leaves no global Hydra state behind.
    assert not GlobalHydra.instance().is_initialized()


def test_compose_applies_overrides_and_presets():
    cfg = lc.compose(["model=llama3_8b", "norm=layernorm", "model.n_layers=3"])
    assert cfg.model.name == "llama3_8b" and cfg.model.d_model == 4096
    assert cfg.model.n_layers == 3
    assert cfg.norm.name == "layernorm"
    spec = resolve_spec(cfg)
    assert spec.components["norm"] == "layernorm" and spec.model.head_dim == 128


@pytest.mark.parametrize("attention, kv_heads", [("mha", 64), ("mqa", 1), ("gqa", 8)])
def test_group_choice_wins_over_preset(attention, kv_heads):
    cfg = lc.compose(["model=llama2_70b", f"attention={attention}"])
    assert cfg.attention.name == attention
    assert cfg.attention.num_kv_heads == kv_heads  # resolves the interpolation
    spec = resolve_spec(cfg)
    assert spec.params["attention"].num_kv_heads == kv_heads
    assert spec.components["attention"] == attention
    assert spec.model.n_heads == 64 and spec.model.d_model == 8192  # still the preset's numbers


def test_preset_sets_its_own_group_choices():
    spec = resolve_spec(lc.compose(["model=mistral_7b"]))
    assert spec.components["attention"] == "swa"
    assert spec.params["attention"].window == 4096
    spec = resolve_spec(lc.compose(["model=gpt2"]))
    assert spec.components == {"position": "learned", "norm": "layernorm", "activation": "gelu_tanh",
                               "attention": "mha", "ffn": "dense", "topology": "decoder_only"}
    assert spec.params["activation"].approximate == "tanh"


def test_gqa_on_mistral_drops_the_window():
    spec = resolve_spec(lc.compose(["model=mistral_7b", "attention=gqa"]))
    assert spec.components["attention"] == "gqa"
    assert spec.params["attention"].window is None
    assert spec.params["attention"].num_kv_heads == 8


# -------------------------------------------------------------------- validation

# overrides, the key path the error names, the bad value, what must be listed as valid
INVALID = [
    pytest.param(["model.n_heads=7"], "model.n_heads", 7, ["1", "2", "4", "8", "16", "32", "64"],
                 id="heads-not-dividing-d_model"),
    pytest.param(["attention.num_kv_heads=3"], "attention.num_kv_heads", 3, ["1", "2", "4"],
                 id="kv-heads-not-dividing-heads"),
    # a number the preset sets under model. is reported under the key the user set
    pytest.param(["model.n_kv_heads=3"], "model.n_kv_heads", 3, ["1", "2", "4", "read as attention.num_kv_heads"],
                 id="preset-kv-heads-not-dividing-heads"),
    pytest.param(["attention=mqa", "attention.num_kv_heads=0"], "attention.num_kv_heads", 0, ["1", "2", "4"],
                 id="zero-kv-heads"),
    pytest.param(["model.rotary_fraction=0.3"], "model.rotary_fraction", 0.3, ["16/16", "read as position.fraction"],
                 id="odd-rotary-dim"),
    pytest.param(["model.head_dim=15"], "model.rotary_fraction", 1.0, ["14/15", "head_dim * fraction = 15"],
                 id="odd-head-dim"),
    pytest.param(["ffn=moe", "model.experts_per_token=9"], "model.experts_per_token", 9,
                 ["1", "2", "3", "4", "5", "6", "7", "8", "read as ffn.top_k"], id="top-k-above-experts"),
    pytest.param(["attention=swa", "model.window=0"], "model.window", 0, ["integer >= 1"],
                 id="zero-window-model"),
    pytest.param(["attention=swa", "attention.window=0"], "attention.window", 0, ["integer >= 1"],
                 id="zero-window-attention"),
    pytest.param(["topology.norm_position=middle"], "topology.norm_position", "middle", ["pre", "post", "sandwich"],
                 id="unknown-norm-placement"),
    pytest.param(["topology.residual=glm", "topology.norm_position=sandwich"], "topology.residual", "glm",
                 ["standard", "norm_position=pre or post"], id="glm-residual-sandwich"),
    pytest.param(["topology.residual=glm", "topology.norm_position=post_output"], "topology.residual", "glm",
                 ["standard", "norm_position=pre or post"], id="glm-residual-post-output"),
    pytest.param(["model.qk_norm_scope=whole"], "model.qk_norm_scope", "whole", ["per_head", "qk_norm=true"],
                 id="qk-norm-scope-without-qk-norm"),
    pytest.param(["model.qk_norm=true", "model.qk_norm_scope=all"], "model.qk_norm_scope", "all",
                 ["per_head", "whole"], id="unknown-qk-norm-scope"),
    pytest.param(["norm=layernorm", "norm.affine=false"], "norm.bias", True, ["false", "affine=true"],
                 id="bias-without-affine"),
    pytest.param(["topology.logit_divisor=0"], "topology.logit_divisor", 0, ["nonzero", "null"],
                 id="zero-logit-divisor"),
    pytest.param(["topology.residual_multiplier=0.0"], "topology.residual_multiplier", 0.0,
                 ["nonzero", "null"], id="zero-residual-multiplier"),
    pytest.param(["topology.parallel_residual=true", "topology.norm_position=sandwich"],
                 "topology.parallel_residual", True, ["norm_position=pre"], id="parallel-sandwich"),
    pytest.param(["topology.final_logit_softcap=0"], "topology.final_logit_softcap", 0, ["> 0", "null"],
                 id="zero-logit-cap"),
    pytest.param(["topology.logit_scale=0"], "topology.logit_scale", 0, ["null"], id="zero-logit-scale"),
    pytest.param(["model.attention_softcap=0"], "model.attention_softcap", 0, ["> 0", "null"],
                 id="zero-attention-cap"),
    pytest.param(["norm.offset=inf"], "norm.offset", float("inf"), ["1.0"], id="infinite-norm-offset"),
    pytest.param(["topology.parallel_residual=true", "topology.norm_position=post"],
                 "topology.parallel_residual", True, ["norm_position=pre"], id="parallel-post-norm"),
    pytest.param(["topology.shared_norm=true"], "topology.shared_norm", True, ["parallel_residual=true"],
                 id="shared-norm-sequential"),
    pytest.param(["position=sinusoidal", "model.d_model=63", "model.n_heads=7"], "model.d_model", 63, ["even"],
                 id="sinusoidal-odd-width"),
    pytest.param(["model.rope_scaling={type:ntk,factor:2}"], "position.scaling.type", "ntk",
                 ["linear", "dynamic", "llama3", "yarn"], id="unknown-rope-scaling"),
    pytest.param(["model.rope_scaling={type:llama3,factor:8}"], "position.scaling.original_max_seq_len", None,
                 ["integer >= 1"], id="llama3-scaling-without-context"),
    # A field the chosen scaling type does not read is refused, not ignored.
    pytest.param(["model.rope_scaling={type:linear,factor:4,beta_fast:16}"], "position.scaling.beta_fast", 16.0,
                 ["32.0", "position.scaling.type=yarn"], id="yarn-field-under-linear-scaling"),
    pytest.param(["model.rope_scaling={type:llama3,factor:8,original_max_seq_len:64,truncate:false}"],
                 "position.scaling.truncate", False, ["position.scaling.type=yarn"], id="yarn-field-under-llama3"),
    pytest.param(["model.rope_scaling={type:linear,factor:4,original_max_seq_len:64}"],
                 "position.scaling.original_max_seq_len", 64, ["None", "type=dynamic"],
                 id="context-under-linear-scaling"),
    # mscale_all_dim: read by YaRN beside mscale, and by MLA attention; with neither it is refused.
    pytest.param(["model.rope_scaling={type:linear,factor:4,mscale_all_dim:0.5}"],
                 "position.scaling.mscale_all_dim", 0.5, ["null", "attention=mla", "beside scaling.mscale"],
                 id="mscale-all-dim-read-by-nothing"),
    pytest.param(["model.rope_scaling={type:yarn,factor:4,original_max_seq_len:16,mscale_all_dim:0.5}"],
                 "position.scaling.mscale_all_dim", 0.5, ["attention=mla"], id="mscale-all-dim-without-mscale"),
    pytest.param(["model.rope_scaling={type:yarn,factor:4,original_max_seq_len:16,mscale_all_dim:0.5,"
                  "attention_factor:1.2}"],
                 "position.scaling.mscale_all_dim", 0.5, ["without scaling.attention_factor"],
                 id="mscale-all-dim-beside-a-given-attention-factor"),
    pytest.param(["model.rope_scaling={type:yarn,factor:4,original_max_seq_len:16,mscale:1,mscale_all_dim:0.5,"
                  "attention_factor:1.2}"],
                 "position.scaling.mscale", 1.0, ["null"], id="mscale-beside-a-given-attention-factor"),
    pytest.param(["model.rope_scaling={type:yarn,factor:4,original_max_seq_len:16,mscale:0.7}"],
                 "position.scaling.mscale", 0.7, ["null", "mscale_all_dim=<value>"], id="mscale-alone"),
    pytest.param(["model.d_model=0"], "model.d_model", 0, ["> 0"], id="zero-width"),
    pytest.param(["activation=gelu", "activation.approximate=erf"], "activation.approximate", "erf",
                 ["none", "tanh"], id="unknown-gelu-approximation"),
]


def _check_message(err: ConfigError, key, value, valid):
    message = str(err)
    assert err.key == key, message
    assert err.value == value, message
    assert message.startswith(f"{key}={value!r}"), message
    for v in valid:
        assert v in message, (v, message)
    assert "Valid:" in message


@pytest.mark.parametrize("overrides, key, value, valid", INVALID)
def test_validation_error_names_key_value_and_valid_choices(tiny_cfg, overrides, key, value, valid):
    cfg = tiny_cfg(*overrides)
    with pytest.raises(ConfigError) as info:
        resolve_spec(cfg)
    _check_message(info.value, key, value, valid)


def test_mscale_all_dim_is_kept_where_mla_reads_it(tiny_cfg):
    """MLA scales its softmax by mscale_all_dim under any scaling type, so there it is read."""
    spec = resolve_spec(tiny_cfg("attention=mla", "model.rope_scaling={type:linear,factor:4,mscale_all_dim:0.5}"))
    assert spec.params["position"].scaling.mscale_all_dim == 0.5


class _RecordAllocations(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_modules(monkeypatch):
    """Constructing a layer or a parameter fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a module was constructed before validation finished")

    monkeypatch.setattr(nn.Linear, "__init__", forbidden)
    monkeypatch.setattr(nn.Embedding, "__init__", forbidden)
    monkeypatch.setattr(nn.Parameter, "__new__", forbidden)


@pytest.mark.parametrize("overrides, key, value, valid", INVALID)
def test_validation_fails_before_any_tensor_is_allocated(tiny_cfg, no_modules, overrides, key, value, valid):
    cfg = tiny_cfg(*overrides)
    recorder = _RecordAllocations()
    for device in ("cpu", "meta"):
        with recorder, pytest.raises(ConfigError) as info:
            lc.build(cfg, device=device)
        assert info.value.key == key
    assert recorder.ops == [], recorder.ops[:5]


def test_allocation_guards_do_fire_on_a_valid_config(tiny_cfg, monkeypatch):
    """The guards above are live: building a valid model trips both."""
    cfg = tiny_cfg()
    recorder = _RecordAllocations()
    with recorder:
        lc.build(cfg, device="cpu")
    assert recorder.ops

    def forbidden(*args, **kwargs):
        raise AssertionError("constructed")

    monkeypatch.setattr(nn.Linear, "__init__", forbidden)
    with pytest.raises(AssertionError, match="constructed"):
        lc.build(cfg, device="meta")


@pytest.mark.parametrize("override, key, value, type_word", [
    ("model.d_model=abc", "model.d_model", "abc", "Integer"),
    ("model.rope_theta=big", "model.rope_theta", "big", "float"),
    ("attention.num_kv_heads=two", "attention.num_kv_heads", "two", "Integer"),
    ("topology.parallel_residual=maybe", "topology.parallel_residual", "maybe", "Bool"),
])
def test_bad_types_fail_at_compose(override, key, value, type_word):
    with pytest.raises(ConfigError) as info:
        lc.compose([override])
    err = info.value
    assert not isinstance(err, UnknownChoiceError)
    assert err.key == key and err.value == value
    message = str(err)
    assert key in message and value in message
    assert type_word.lower() in message.lower(), message


def test_unknown_key_suggests_the_closest():
    with pytest.raises(ConfigError) as info:
        lc.compose(["model.dmodel=64"])
    err = info.value
    assert err.key == "model.dmodel"
    assert "model.d_model" in str(err)
    with pytest.raises(ConfigError) as info:
        lc.compose(["attention=swa", "attention.widow=4"])
    assert "attention.window" in str(info.value)


# ----------------------------------------------------------- unknown choices


@pytest.mark.parametrize("overrides, group, typo, expected", [
    (["attention=gqq"], "attention", "gqq", "gqa"),
    (["norm=rmsnrom"], "norm", "rmsnrom", "rmsnorm"),
    (["model=llama2_7"], "model", "llama2_7", "llama2_7b"),
    (["model.n_layers=2", "ffn=mo"], "ffn", "mo", "moe"),
    # inside a sweep value list: every value is checked, not only the first
    (["attention=mha,gqq"], "attention", "gqq", "gqa"),
    (["attention=choice(mqa,gqq)"], "attention", "gqq", "gqa"),
    (["activation=gelu,silu,swigl", "attention=mha"], "activation", "swigl", "swiglu"),
])
def test_unknown_choice_in_compose_suggests_closest(overrides, group, typo, expected):
    with pytest.raises(UnknownChoiceError) as info:
        lc.compose(overrides)
    err = info.value
    assert err.group == group and err.key == group and err.value == typo
    assert err.suggestions[0] == expected
    message = str(err)
    assert f"{group}={typo!r}" in message and repr(expected) in message
    assert not GlobalHydra.instance().is_initialized()


def test_resolve_spec_is_typed():
    spec = resolve_spec(lc.compose(["model=llama2_7b"]))
    assert spec.model.head_dim == 128
    assert isinstance(spec.params["attention"].num_kv_heads, int)
    assert spec.params["attention"].num_kv_heads == 32  # llama2_7b is MHA
    assert spec.params["norm"].eps == pytest.approx(1e-5)


def test_a_key_a_preset_sets_that_the_chosen_plugin_lacks_is_named():
    """gpt-oss's preset sets attention.sinks; with attention=mla that key has nowhere to go: the
    error names the key, the preset that set it, and the keys MLA has."""
    with pytest.raises(ConfigError) as info:
        lc.compose(["model=gpt_oss_20b", "attention=mla"])
    assert info.value.key == "attention.sinks"
    assert "model=gpt_oss_20b sets this key" in str(info.value) and "kv_lora_rank" in str(info.value)
