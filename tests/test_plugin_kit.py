"""The plugin author's kit: llmarch_compose.testing passes built-in plugins and fails
deliberately broken ones with messages that say what broke; `task=plugins` lists
every plugin with its params as written, and a name two distributions register
fails by naming both."""

from __future__ import annotations

import json

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.plugin import registry as plugins
from llmarch_compose.tasks import plugins as plugins_task
from llmarch_compose.plugin.interfaces import Attention
from llmarch_compose.testing import (PluginCheckError, build_with, check_causal, check_compiled, check_decoding,
                                     check_gradients, check_plugin, check_shapes, run_llmarch, shared_graphs,
                                     temporary_plugins, write_distribution)

DIST = "llmarch-compose"


# --------------------------------------------------------------- built-ins pass


@pytest.mark.slow
def test_gqa_passes_every_check_compiled_included():
    report = check_plugin("attention", "gqa")
    assert report.checks == ["shapes", "gradients", "causal", "compiled (regional)", "compiled (whole)"]
    assert report.instances == 2 and report.parameters > 0
    assert all(diff < 1e-5 for diff in report.compiled_max_diff.values())


@pytest.mark.parametrize("group, choice, overrides", [
    ("attention", "mla", ["model.kv_lora_rank=16", "model.qk_rope_head_dim=4", "model.qk_nope_head_dim=8",
                          "model.v_head_dim=8"]),
    ("attention", "mqa", []),
    ("norm", "layernorm", []),
    ("ffn", "moe", ["model.n_experts=4", "model.experts_per_token=2"]),
    ("position", "alibi", []),
    ("position", "learned", []),
    ("activation", "geglu_tanh", []),
    ("topology", "encoder_decoder", []),
])
def test_builtins_pass_the_eager_checks(group, choice, overrides):
    report = check_plugin(group, choice, overrides, compiled=False)
    assert report.checks[:2] == ["shapes", "gradients"]
    assert report.label.startswith(f"{group}={choice}") and DIST in report.label


def test_expected_shared_graphs_counts_stacks():
    assert shared_graphs(build_with("attention", "gqa")) == 1
    assert shared_graphs(build_with("topology", "encoder_decoder")) == 2


# ------------------------------------------------------------ broken plugins fail


def gqa_subclass(name: str, **methods) -> type:
    """Register `attention/<name>`: GQA with some methods replaced (inside temporary_plugins)."""
    base = plugins.get("attention", "gqa")
    cls = type(name.title().replace("_", ""), (base.cls,), {"__module__": __name__, "__doc__": name, **methods})
    return plugins.register("attention", name, params=base.params)(cls)


def half_width(self, x, pos, memory=None):
    return super(type(self), self).forward(x, pos, memory)[..., : x.shape[-1] // 2]


def data_dependent_branch(self, x, pos, memory=None):
    out = super(type(self), self).forward(x, pos, memory)
    if out.sum() > 0:  # a Python branch on a tensor's value: a graph break
        return out
    return -out


def sees_the_future(self, x, pos, memory=None):
    self.causal = False
    return super(type(self), self).forward(x, pos, memory)


def detached_output(self, x, pos, memory=None):
    return super(type(self), self).forward(x, pos, memory).detach()


def nan_output(self, x, pos, memory=None):
    return super(type(self), self).forward(x, pos, memory) * float("nan")


def compiled_differs(self, x, pos, memory=None):
    out = super(type(self), self).forward(x, pos, memory)
    return out * 1.5 if torch.compiler.is_compiling() else out


def per_layer_number(self, params, ctx, layer_idx=0, **kwargs):
    type(self).__mro__[1].__init__(self, params, ctx, layer_idx=layer_idx, **kwargs)
    self.gain = 1.0 + layer_idx  # a Python float that differs between layers


def scaled_by_gain(self, x, pos, memory=None):
    return super(type(self), self).forward(x, pos, memory) * self.gain


@pytest.mark.parametrize("name, methods, check, message", [
    ("kit_half_width", {"forward": half_width}, check_shapes,
     "output shape (2, 8, 16) differs from the input's (2, 8, 32)"),
    ("kit_nan", {"forward": nan_output}, check_shapes, "non-finite"),
    ("kit_detached", {"forward": detached_output}, check_gradients, "no gradient reached"),
    ("kit_future", {"forward": sees_the_future}, check_causal, "a query sees a later key"),
])
def test_broken_plugin_fails_the_eager_check(name, methods, check, message):
    with temporary_plugins():
        gqa_subclass(name, **methods)
        pm = build_with("attention", name)
        with pytest.raises(PluginCheckError) as info:
            check(pm, pm.input_ids())
        text = str(info.value)
        assert text.startswith(f"attention={name} from ") and message in text, text
        with pytest.raises(PluginCheckError):  # and check_plugin stops there too
            check_plugin("attention", name, compiled=False)


def test_graph_break_fails_fullgraph_with_its_location():
    with temporary_plugins():
        gqa_subclass("kit_branch", forward=data_dependent_branch)
        pm = build_with("attention", "kit_branch")
        check_shapes(pm, pm.input_ids())  # eager is fine
        with pytest.raises(PluginCheckError) as info:
            check_compiled(pm, pm.input_ids())
    text = str(info.value)
    assert "regional llmarch_compose.compile: failed with fullgraph=True" in text
    assert "Data-dependent branching" in text and "data_dependent_branch" in text  # what, and where


@pytest.mark.slow
def test_compiled_result_that_differs_from_eager_fails():
    with temporary_plugins():
        gqa_subclass("kit_compiled_differs", forward=compiled_differs)
        pm = build_with("attention", "kit_compiled_differs")
        with pytest.raises(PluginCheckError) as info:
            check_compiled(pm, pm.input_ids())
    assert "logits differs from eager" in str(info.value)


@pytest.mark.slow
def test_per_layer_python_number_fails_the_one_graph_check():
    with temporary_plugins():
        gqa_subclass("kit_per_layer", __init__=per_layer_number, forward=scaled_by_gain)
        pm = build_with("attention", "kit_per_layer")
        with pytest.raises(PluginCheckError) as info:
            check_compiled(pm, pm.input_ids(), max_graphs=shared_graphs(pm))
    assert "compiled 2 graphs where 1 should serve every layer" in str(info.value)


def test_temporary_plugins_leave_nothing_behind():
    with temporary_plugins():
        gqa_subclass("kit_gone")
        assert "kit_gone" in plugins.names("attention")
    assert "kit_gone" not in plugins.names("attention")
    with pytest.raises(ConfigError):
        lc.compose(["attention=kit_gone"])


# ------------------------------------------------------------------ task=plugins


def run_task(capsys, *overrides: str):
    result = plugins_task.run(lc.compose(["task=plugins", *overrides]))
    return result, capsys.readouterr().out


@pytest.mark.slow
def test_plugins_task_lists_every_plugin_with_params_as_written(capsys):
    result, out = run_task(capsys, "task.format=json")
    assert json.loads(out) == json.loads(json.dumps(result, default=str))
    listed = {(g, row["name"]) for g, rows in result["groups"].items() for row in rows}
    assert listed == {(p.group, p.name) for p in plugins.iter_plugins()}
    gqa = next(row for row in result["groups"]["attention"] if row["name"] == "gqa")
    assert gqa["package"] == DIST and gqa["version"] == lc.__version__
    assert gqa["class"] == "llmarch_compose.registry.attention.gqa.GroupedQueryAttention"
    assert gqa["doc"].startswith("Grouped-query attention:") and "\n" not in gqa["doc"]
    params = {p["name"]: p for p in gqa["params"]}
    assert params["num_kv_heads"] == {"name": "num_kv_heads", "type": "int", "default": "${model.n_kv_heads}"}
    assert params["window"]["default"] is None
    assert gqa["variants"] == ["mha", "mqa", "swa"]
    assert result["broken_variants"] == {}


def test_plugins_task_text_and_group_filter(capsys):
    result, out = run_task(capsys, "task.group=norm")
    assert list(result["groups"]) == ["norm"]
    assert out.splitlines()[0] == f"norm ({len(plugins.names('norm'))} plugins)"
    assert f"rmsnorm  [{DIST} {lc.__version__}]  llmarch_compose.registry.norm.rmsnorm.RMSNorm" in out
    assert "eps: float = ${model.norm_eps}" in out
    assert "attention" not in out


@pytest.mark.parametrize("override, key, valid", [
    ("task.group=atention", "task.group", "attention"),
    ("task.format=yaml", "task.format", "json"),
])
def test_plugins_task_bad_settings(capsys, override, key, valid):
    with pytest.raises(ConfigError) as info:
        run_task(capsys, override)
    assert info.value.key == key and valid in str(info.value)


CLASH = '''
from dataclasses import dataclass
import torch
from torch import nn
from llmarch_compose import register


@dataclass
class ClashParams:
    eps: float = 1e-6


@register("norm", "clashnorm", params=ClashParams)
class ClashNorm{n}(nn.Module):
    """A norm both distributions call clashnorm."""

    def __init__(self, params, ctx, dim=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim or ctx.model.d_model))

    def forward(self, x):
        return self.weight * x
'''


@pytest.mark.slow
def test_same_name_from_two_distributions_names_both(tmp_path):
    site = tmp_path / "site"
    for n, dist in enumerate(("kit-norms-alpha", "kit-norms-beta")):
        module = dist.replace("-", "_")
        write_distribution(site, dist, {f"{module}/__init__.py": CLASH.format(n=n)}, {"clashnorm": module})
    proc = run_llmarch(["task=plugins"], pythonpath=[site], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    err = proc.stderr
    assert err.startswith("llmarch: error: norm plugin 'clashnorm' is registered twice")
    assert "kit-norms-alpha (kit_norms_alpha.ClashNorm0)" in err and "kit-norms-beta (kit_norms_beta.ClashNorm1)" in err


# ------------------------------------------------------------ the decoding check

@pytest.mark.parametrize("group, choice, overrides", [
    ("attention", "gqa", []),
    ("attention", "mqa", []),
    ("attention", "swa", ["model.window=3"]),
    ("attention", "mla", ["model.kv_lora_rank=16", "model.qk_rope_head_dim=4", "model.qk_nope_head_dim=8",
                          "model.v_head_dim=8"]),
    ("position", "alibi", []),
    ("position", "learned", []),
])
def test_builtins_decode_with_the_full_forward_logits(group, choice, overrides):
    report = check_plugin(group, choice, overrides, compiled=False, decoding=True)
    assert "decoding" in report.checks


def decodes_differently(self, x, pos, memory=None, cache=None):
    """A cached path that computes something other than the training path."""
    out = super(type(self), self).forward(x, pos, memory, cache=cache)
    return out * 1.01 if pos.decoding is not None else out


@pytest.mark.parametrize("name, methods, message", [
    ("kit_drifting", {"forward": decodes_differently}, "cached decoding differs from the full forward by"),
    ("kit_uncached", {"new_cache": Attention.new_cache}, "kit_uncached"),
])
def test_a_plugin_whose_cache_is_wrong_or_missing_fails_the_decoding_check(name, methods, message):
    with temporary_plugins():
        gqa_subclass(name, **methods)
        pm = build_with("attention", name)
        check_shapes(pm, pm.input_ids())  # its training path is fine
        with pytest.raises(PluginCheckError) as info:
            check_decoding(pm, pm.input_ids())
        text = str(info.value)
        assert text.startswith(f"attention={name} from ") and ": decoding: " in text and message in text, text
        with pytest.raises(PluginCheckError):
            check_plugin("attention", name, compiled=False, decoding=True)


def test_the_decoding_check_needs_a_causal_lm():
    pm = build_with("topology", "encoder_only")
    with pytest.raises(PluginCheckError, match="decoding: the check decodes a causal LM"):
        check_decoding(pm, pm.input_ids())
