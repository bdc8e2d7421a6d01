"""The plugin registry: lookup with suggestions, conflicts, reserved keys, the
ConfigStore nodes registration creates, and discovery of a third-party plugin
through the entry-point group (in a subprocess, with no change to the project)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hydra.core.config_store import ConfigStore
from torch import nn

import llmarch_compose as lc
from llmarch_compose import ConfigError, PluginConflictError, UnknownChoiceError
from llmarch_compose.plugin import registry as plugins
from llmarch_compose.config.spec import make_params
from llmarch_compose.model.card import architecture_card
from llmarch_compose.config.spec import resolve_spec

BUILTINS = {
    "position": {"alibi", "learned", "none", "relative_bias", "rope", "rope_2d", "sinusoidal"},
    "norm": {"layernorm", "rmsnorm"},
    "activation": {"gelu", "geglu", "relu", "reglu", "silu", "swiglu", "swiglu_clamped"},
    "attention": {"gqa", "mla"},
    "ffn": {"dense", "moe"},
    "topology": {"decoder_only", "encoder_decoder", "encoder_only", "prefix_decoder"},
}
DIST = "llmarch-compose"


@pytest.fixture
def restore_registry():
    """Snapshot the registry and the ConfigStore groups; put both back afterwards."""
    plugins.discover()
    saved = {g: dict(plugins._registry[g]) for g in plugins.GROUPS}
    repo = ConfigStore.instance().repo
    saved_store = {g: dict(repo.get(g, {})) for g in plugins.GROUPS}
    yield
    for g in plugins.GROUPS:
        plugins._registry[g].clear()
        plugins._registry[g].update(saved[g])
        repo[g].clear()
        repo[g].update(saved_store[g])


# ----------------------------------------------------------------------- lookup


@pytest.mark.parametrize("group, typo, expected", [
    ("attention", "gqq", "gqa"),
    ("norm", "rmsnrom", "rmsnorm"),
    ("norm", "layernom", "layernorm"),
    ("position", "rop", "rope"),
    ("activation", "swigelu", "swiglu"),
])
def test_get_unknown_name_suggests_closest(group, typo, expected):
    with pytest.raises(UnknownChoiceError) as info:
        plugins.get(group, typo)
    err = info.value
    assert err.group == group
    assert err.suggestions and err.suggestions[0] == expected
    message = str(err)
    assert group in message and repr(typo) in message and repr(expected) in message
    # It is also a ConfigError and a LookupError, so generic handlers catch it.
    assert isinstance(err, ConfigError) and isinstance(err, LookupError)


def test_get_known_name_returns_plugin_info():
    info = plugins.get("attention", "gqa")
    assert info.group == "attention" and info.name == "gqa"
    assert issubclass(info.cls, lc.Attention)
    assert info.cls.plugin_group == "attention" and info.cls.plugin_name == "gqa"


def test_get_unknown_group_raises():
    with pytest.raises(UnknownChoiceError) as info:
        plugins.get("atention", "gqa")
    assert info.value.suggestions[0] == "attention"


# -------------------------------------------------------------------- register


def _foreign_class(module: str, name: str = "Impostor") -> type:
    return type(name, (nn.Module,), {"__module__": module})


def test_same_name_from_other_module_conflicts(restore_registry):
    before = plugins.get("norm", "rmsnorm")
    with pytest.raises(PluginConflictError) as info:
        plugins.register("norm", "rmsnorm")(_foreign_class("other_pkg.norms", "OtherRMSNorm"))
    message = str(info.value)
    # Both sides are named: package, module and class.
    assert "'rmsnorm'" in message
    assert DIST in message and "llmarch_compose.registry.norm.rmsnorm.RMSNorm" in message
    assert "other_pkg" in message and "other_pkg.norms.OtherRMSNorm" in message
    # The existing plugin is untouched.
    assert plugins.get("norm", "rmsnorm") is before
    assert ConfigStore.instance().repo["norm"]["rmsnorm.yaml"].provider == DIST


def test_same_name_from_same_module_replaces(restore_registry):
    """Re-registering from the module that owns the name (a reload) is not a conflict."""
    cls = _foreign_class("llmarch_compose.registry.norm.rmsnorm", "RMSNormReloaded")
    plugins.register("norm", "rmsnorm", params=plugins.get("norm", "rmsnorm").params)(cls)
    assert plugins.get("norm", "rmsnorm").cls is cls


def test_register_into_unknown_group_fails(restore_registry):
    with pytest.raises(UnknownChoiceError) as info:
        plugins.register("atention", "mynorm")
    assert info.value.suggestions[0] == "attention"
    assert "atention" in str(info.value)
    assert all("mynorm" not in plugins._registry[g] for g in plugins.GROUPS)


@pytest.mark.parametrize("reserved", ["plugin", "name"])
def test_reserved_param_keys_rejected(reserved, restore_registry):
    params = dataclasses.make_dataclass("BadParams", [(reserved, str, dataclasses.field(default="x")),
                                                      ("eps", float, dataclasses.field(default=1e-5))])
    with pytest.raises(TypeError, match=reserved):
        plugins.register("norm", "badnorm", params=params)
    assert "badnorm" not in plugins._registry["norm"]
    assert "badnorm.yaml" not in ConfigStore.instance().repo["norm"]


def test_params_must_be_a_dataclass(restore_registry):
    class NotADataclass:
        eps: float = 1e-5

    with pytest.raises(TypeError, match="dataclass"):
        plugins.register("norm", "badnorm", params=NotADataclass)


@dataclass
class _HalfParams:
    scale: float = 0.5


def test_register_in_process_makes_choice_composable_and_buildable(restore_registry):
    @plugins.register("activation", "halfrelu", params=_HalfParams)
    class HalfReLU(lc.Activation):
        def __init__(self, params, ctx):
            super().__init__()
            self.scale = params.scale

        def forward(self, x):
            return torch.relu(x) * self.scale

    info = plugins.get("activation", "halfrelu")
    assert info.cls is HalfReLU and info.params is _HalfParams
    assert info.package == __name__.split(".")[0]
    node = ConfigStore.instance().load("activation/halfrelu.yaml").node
    assert node.plugin == "halfrelu" and node.name == "halfrelu" and node.scale == 0.5

    cfg = lc.compose(["activation=halfrelu", "activation.scale=0.25", "model.n_layers=1", "model.d_model=32",
                      "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=48"])
    spec = resolve_spec(cfg)
    assert spec.params["activation"].scale == 0.25
    model = lc.build(spec)
    acts = [m for m in model.modules() if isinstance(m, HalfReLU)]
    assert acts and all(a.scale == 0.25 for a in acts)
    # Not gated: the FFN's up projection is ffn_dim wide, not 2 * ffn_dim.
    assert model.decoder.blocks[0].ffn.up.out_features == 48


# ------------------------------------------------------------- ConfigStore nodes


def _all_builtins():
    plugins.discover()
    return [(p.group, p.name) for p in plugins.iter_plugins() if p.package == DIST]


@pytest.mark.parametrize("group, name", sorted((g, n) for g, ns in BUILTINS.items() for n in ns))
def test_builtin_params_are_in_config_store(group, name):
    plugins.discover()
    info = plugins.get(group, name)
    stored = ConfigStore.instance().load(f"{group}/{name}.yaml")
    assert stored.provider == DIST
    node = stored.node
    assert node.plugin == name and node.name == name
    assert set(node.keys()) == {f.name for f in dataclasses.fields(info.params)} | {"plugin", "name"}
    cfg = lc.compose([f"{group}={name}"])
    assert cfg[group].plugin == name and cfg[group].name == name


def test_gqa_composes_without_a_yaml_file():
    conf = importlib.resources.files("llmarch_compose.conf")
    assert not (conf / "attention" / "gqa.yaml").is_file()
    assert (conf / "attention" / "mqa.yaml").is_file()  # the folder is the one Hydra searches
    cfg = lc.compose(["attention=gqa", "model=llama2_70b"])
    assert cfg.attention.plugin == "gqa" and cfg.attention.name == "gqa"
    assert resolve_spec(cfg).params["attention"].num_kv_heads == 8


def test_iter_plugins_lists_builtins_with_their_package():
    found: dict[str, set[str]] = {}
    for p in plugins.iter_plugins():
        if p.package != DIST:
            continue
        found.setdefault(p.group, set()).add(p.name)
        assert p.module.startswith(f"llmarch_compose.registry.{p.group}."), p
        assert p.doc, f"{p.group}/{p.name} has no docstring"
    assert found == BUILTINS
    # Every built-in comes from this distribution, none from elsewhere.
    names = {(p.group, p.name) for p in plugins.iter_plugins()}
    assert {(g, n) for g, ns in BUILTINS.items() for n in ns} <= names


def test_builtins_are_declared_as_entry_points():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=plugins.ENTRY_POINT_GROUP)
           if ep.dist is not None and ep.dist.name == DIST}
    # The component groups, and the modules that register the other named choices.
    others = {"tasks": "llmarch_compose.tasks", "data": "llmarch_compose.train.data",
              "precision": "llmarch_compose.model.precision", "scale": "llmarch_compose.config.scale",
              "compile": "llmarch_compose.model.compiler", "parallel": "llmarch_compose.train.parallel",
              "hf": "llmarch_compose.interop.hf",
              "sweep": "llmarch_compose.sweep.callback"}
    assert set(eps) == set(plugins.GROUPS) | set(others)
    for name, ep in eps.items():
        assert ep.value == others.get(name, f"llmarch_compose.registry.{name}")


def test_make_params_types_and_names_errors():
    p = make_params("norm", {"plugin": "rmsnorm", "name": "rmsnorm", "eps": 1e-6})
    assert p.eps == 1e-6 and p.plugin == "rmsnorm"
    with pytest.raises(ConfigError) as info:
        make_params("norm", {"plugin": "rmsnorm", "name": "rmsnorm", "eps": "tiny"})
    assert info.value.key == "norm.eps" and "tiny" in str(info.value)
    with pytest.raises(UnknownChoiceError) as info:
        make_params("norm", {"plugin": "rmsnrom", "name": "rmsnrom"})
    assert info.value.suggestions == ["rmsnorm"]
    with pytest.raises(ConfigError) as info:
        make_params("norm", {"name": "rmsnorm"})
    assert info.value.key == "norm.plugin"


# ------------------------------------------------------ a third-party plugin

SCALENORM = '''
from dataclasses import dataclass

import torch
from torch import nn

from llmarch_compose import register


@dataclass
class ScaleNormParams:
    eps: float = 1e-5


@register("norm", "scalenorm", params=ScaleNormParams)
class ScaleNorm(nn.Module):
    """ScaleNorm: g * x / ||x|| with one learned scalar."""

    def __init__(self, params, ctx, dim=None):
        super().__init__()
        self.eps = params.eps
        self.g = nn.Parameter(torch.tensor(float(dim or ctx.model.d_model) ** 0.5))

    def forward(self, x):
        return self.g * x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)
'''

CONFLICT = '''
from torch import nn

from llmarch_compose import register


@register("norm", "rmsnorm")
class MyRMSNorm(nn.Module):
    def __init__(self, params, ctx, dim=None):
        super().__init__()
'''


def _fake_distribution(root: Path, dist: str, module: str, source: str, eps: dict[str, str]) -> None:
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in eps.items())
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")


def _run_cli(args, cwd: Path, pythonpath: Path):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(pythonpath) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llmarch_compose", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def scalenorm_site(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "my_norm_plugin", "my_norm_plugin", SCALENORM,
                       {"scalenorm": "my_norm_plugin"})
    return site


@pytest.mark.slow
def test_third_party_plugin_discovered_through_entry_points(scalenorm_site, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = _run_cli(["norm=scalenorm", "task=summary", "task.format=json"], work, scalenorm_site)
    assert proc.returncode == 0, proc.stderr
    card = json.loads(proc.stdout.strip().splitlines()[-1])
    assert card["components"]["norm"] == "scalenorm"
    assert card["plugins"]["norm"] == "scalenorm"

    # Same config with the built-in RMSNorm, counted in this process.
    base = architecture_card(resolve_spec(lc.compose(["task=summary"])))
    d, layers = base["dimensions"]["d_model"], base["dimensions"]["n_layers"]
    norms = 2 * layers + 1  # two per pre-norm block and the final norm
    assert card["params_total"] == base["params_total"] - norms * d + norms * 1
    assert card["params_embedding"] == base["params_embedding"]
    assert card["params_total"] != base["params_total"]

    # No config file was written for it anywhere: not in the project, not in the plugin's folder.
    conf = importlib.resources.files("llmarch_compose.conf")
    assert not (conf / "norm").is_dir() or not (conf / "norm" / "scalenorm.yaml").is_file()
    assert not list(scalenorm_site.rglob("*.yaml")) and not list(work.rglob("scalenorm.yaml"))


@pytest.mark.slow
def test_third_party_plugin_appears_in_suggestions(scalenorm_site, tmp_path):
    proc = _run_cli(["norm=scalnorm", "task=summary"], tmp_path, scalenorm_site)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "'scalenorm'" in proc.stderr and "norm" in proc.stderr


@pytest.mark.slow
def test_third_party_conflict_names_both_packages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # "zz_..." sorts after the built-in "norm" entry point, so the built-in registers first.
    _fake_distribution(site, "my_conflicting_norms", "my_conflicting_norms", CONFLICT,
                       {"zz_rmsnorm": "my_conflicting_norms"})
    proc = _run_cli(["task=summary"], tmp_path, site)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "rmsnorm" in proc.stderr
    assert DIST in proc.stderr and "my_conflicting_norms" in proc.stderr


@pytest.mark.slow  # a fresh interpreter
def test_the_facade_imports_no_task_benchmark_sweep_or_adapter():
    """`import llmarch_compose` is the facade alone: tasks, benchmarks, the sweep report and
    the Hugging Face adapter load when a command or the registry needs them."""
    code = ("import sys, llmarch_compose; print(sorted(m for m in sys.modules if m.startswith("
            "('llmarch_compose.tasks', 'llmarch_compose.bench', 'llmarch_compose.sweep', 'llmarch_compose.interop', "
            "'llmarch_compose.cli', 'llmarch_compose.registry'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def test_the_core_stages_never_import_the_layers_above_them():
    """plugin/, config/, model/, train/ and artifacts/ import no task, benchmark, sweep, adapter,
    CLI or particular plugin, at the top or inside a function."""
    import ast

    root = Path(lc.__file__).parent
    above = ("tasks", "bench", "sweep", "interop", "cli", "registry")
    for stage in ("plugin", "config", "model", "train", "artifacts"):
        for path in (root / stage).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 2 and node.module:
                    assert node.module.split(".")[0] not in above, (path, node.module)
                if isinstance(node, (ast.ImportFrom, ast.Import)):
                    names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                    for name in names:
                        assert not any(name.startswith(f"llmarch_compose.{a}") for a in above), (path, name)
