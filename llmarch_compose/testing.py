"""Checks for plugin authors, callable from their own pytest suites.

    from llmarch_compose.testing import check_plugin

    def test_my_attention():
        check_plugin("attention", "my_attention")

`check_plugin` composes a tiny model with one choice selected, builds it, and
runs every check below; each is also a function of its own, to run alone or with
other settings. A failed check raises `PluginCheckError` (an AssertionError, so
pytest reports it as a failure) whose message names the plugin, the check and
what differed.

- `check_shapes`: every instance of the plugin is called and returns the shape
  its group's contract asks for (norm, activation, attention and FFN keep the
  input's shape; a position encoding keeps q, k and the embeddings' shapes; a
  topology returns [batch, seq, vocab] logits), with finite values.
- `check_gradients`: forward and backward; every parameter of the plugin gets a
  finite gradient, and together they get a nonzero one.
- `check_causal`: in a causal LM, changing the last token changes no earlier logit.
- `check_compiled`: `torch.compile(fullgraph=True)`, regional (`llmarch_compose.compile`)
  or of the whole model, gives eager's outputs and gradients; regionally, one
  graph serves every layer of a stack.

`temporary_plugins` undoes the registrations made inside it (variants a test
registers). `write_distribution` and `run_llmarch` test discovery the way users
meet it: a plugin distribution in a folder on PYTHONPATH and the `llmarch`
command in a subprocess.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from torch import nn
from torch._dynamo.utils import counters

from .plugin import registry as plugins
from .model.build import build
from .model.compiler import compile as compile_model
from .errors import LlmarchError
from .plugin.interfaces import FeedForwardOutput, ModelOutput, PositionInputs
from .plugin.objectives import CAUSAL_LM
from .config.compose import compose
from .config.spec import resolve_spec

#: Sizes small enough that every check, compiling included, takes seconds on a CPU.
TINY_MODEL = ("model.d_model=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_dim=48", "model.vocab_size=64", "model.max_seq_len=32")
#: Groups whose modules map a [..., width] input to an output of the same shape.
SHAPE_PRESERVING = ("norm", "activation", "attention", "ffn")


class PluginCheckError(AssertionError):
    """A plugin failed one of the checks of `llmarch_compose.testing`."""


@dataclass
class PluginModel:
    """A tiny model built with one choice selected, and the plugin's instances in it."""

    group: str
    choice: str  # as selected: a plugin's name or a YAML variant of it
    info: plugins.PluginInfo
    cfg: DictConfig
    model: nn.Module
    instances: list[nn.Module]

    @property
    def label(self) -> str:
        plugin = f" (plugin {self.info.name})" if self.info.name != self.choice else ""
        return f"{self.group}={self.choice}{plugin} from {self.info.package}"

    def input_ids(self, batch: int = 2, seq_len: int = 8, seed: int = 1) -> torch.Tensor:
        vocab = int(self.cfg.model.vocab_size)
        return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))

    def parameters(self) -> dict[str, nn.Parameter]:
        """The plugin's own trainable parameters, by their name in the model."""
        mine = {id(p) for m in self.instances for p in m.parameters()}
        return {n: p for n, p in self.model.named_parameters() if id(p) in mine and p.requires_grad}


@dataclass
class PluginReport:
    """What `check_plugin` checked and measured."""

    label: str
    instances: int
    parameters: int
    checks: list[str] = field(default_factory=list)
    compiled_max_diff: dict[str, float] = field(default_factory=dict)  # how -> largest |compiled - eager|


def build_with(group: str, choice: str, overrides: Sequence[str] = (), seed: int = 0) -> PluginModel:
    """Compose a tiny model (TINY_MODEL) with `group=choice` and `overrides`, and build it on the CPU."""
    if group not in plugins.GROUPS:
        raise PluginCheckError(f"unknown plugin group {group!r}; the groups are {', '.join(plugins.GROUPS)}")
    cfg = compose([*TINY_MODEL, f"{group}={choice}", *overrides])
    spec = resolve_spec(cfg)
    info = spec.plugin(group)
    torch.manual_seed(seed)
    model = build(spec, device="cpu")
    instances = [m for m in model.modules() if type(m) is info.cls]
    pm = PluginModel(group, choice, info, cfg, model, instances)
    if not instances:
        raise PluginCheckError(f"{pm.label}: the built model holds no {info.cls.__qualname__}; "
                               "is it overridden by a layer pattern or the topology?")
    return pm


def _fail(pm: PluginModel, check: str, problem: str) -> PluginCheckError:
    return PluginCheckError(f"{pm.label}: {check}: {problem}")


def _first_tensor(value):
    if isinstance(value, FeedForwardOutput):
        return value.output
    return value


def loss_of(out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over every position, plus the auxiliary loss when there is one."""
    loss = F.cross_entropy(out.logits.flatten(0, 1).float(), targets.flatten())
    return loss if out.aux_loss is None else loss + out.aux_loss


def _targets(pm: PluginModel, input_ids: torch.Tensor) -> torch.Tensor:
    return pm.input_ids(*input_ids.shape, seed=2)


def check_shapes(pm: PluginModel, input_ids: torch.Tensor) -> None:
    """Every instance is used and returns the shape its group's contract asks for, finite."""
    if pm.group == "position":
        _check_position_shapes(pm, input_ids)
    calls: dict[int, int] = {}

    def hook(module, args, output):
        calls[id(module)] = calls.get(id(module), 0) + 1
        x, y = args[0], _first_tensor(output)
        if pm.group == "ffn" and not isinstance(output, FeedForwardOutput):
            raise _fail(pm, "shapes",
                        f"an FFN returns FeedForwardOutput(output, aux_loss), got {type(output).__name__}")
        if not isinstance(y, torch.Tensor):
            raise _fail(pm, "shapes", f"forward returned {type(y).__name__}, expected a tensor")
        if y.shape != x.shape:
            raise _fail(pm, "shapes", f"output shape {tuple(y.shape)} differs from the input's {tuple(x.shape)}")
        if not torch.isfinite(y).all():
            raise _fail(pm, "shapes", "the output has non-finite values")

    handles = [m.register_forward_hook(hook) for m in pm.instances] if pm.group in SHAPE_PRESERVING else []
    try:
        with torch.no_grad():
            out = pm.model(input_ids)
    finally:
        for h in handles:
            h.remove()
    unused = [m for m in pm.instances if pm.group in SHAPE_PRESERVING and id(m) not in calls]
    if unused:
        raise _fail(pm, "shapes", f"{len(unused)} of {len(pm.instances)} instances were never called in forward")
    if not isinstance(out, ModelOutput):
        raise _fail(pm, "shapes", f"the model returned {type(out).__name__}, expected ModelOutput")
    expected = (*input_ids.shape, int(pm.cfg.model.vocab_size))
    if tuple(out.logits.shape) != expected:
        raise _fail(pm, "shapes", f"logits have shape {tuple(out.logits.shape)}, expected {expected}")
    if not torch.isfinite(out.logits).all():
        raise _fail(pm, "shapes", "the logits have non-finite values")


def _check_position_shapes(pm: PluginModel, input_ids: torch.Tensor) -> None:
    """The three position hooks, called directly (modules capture them when built)."""
    m = resolve_spec(pm.cfg).model
    b, t = input_ids.shape
    positions = torch.arange(t)
    for position in pm.instances:
        with torch.no_grad():
            x = torch.randn(b, t, m.embedding_width)
            if position.embed(x, positions).shape != x.shape:
                raise _fail(pm, "shapes", "embed(x, positions) changed the shape of x")
            inputs = position.attention_inputs(positions)
            if not isinstance(inputs, PositionInputs):
                raise _fail(pm, "shapes", f"attention_inputs returned {type(inputs).__name__}, expected PositionInputs")
            if inputs.bias is not None and tuple(inputs.bias.shape[-2:]) != (t, t):
                raise _fail(pm, "shapes", f"a score bias for {t} tokens must end in ({t}, {t}), "
                                          f"got {tuple(inputs.bias.shape)}")
            q, k = torch.randn(b, m.n_heads, t, m.head_dim), torch.randn(b, m.n_kv_heads, t, m.head_dim)
            q2, k2 = position.rotate(q, k, inputs._replace(positions=positions))
            if q2.shape != q.shape or k2.shape != k.shape:
                raise _fail(pm, "shapes", f"rotate changed q {tuple(q.shape)} -> {tuple(q2.shape)} "
                                          f"or k {tuple(k.shape)} -> {tuple(k2.shape)}")


def check_gradients(pm: PluginModel, input_ids: torch.Tensor) -> None:
    """Forward and backward: each of the plugin's parameters gets a finite gradient,
    and together a nonzero one (the plugin's weights reach the loss)."""
    pm.model.zero_grad(set_to_none=True)
    loss = loss_of(pm.model(input_ids), _targets(pm, input_ids))
    if not torch.isfinite(loss):
        raise _fail(pm, "gradients", f"the loss is {loss.item()}")
    loss.backward()
    params = pm.parameters()
    missing = [n for n, p in params.items() if p.grad is None]
    if missing:
        raise _fail(pm, "gradients", f"no gradient reached {', '.join(missing)}")
    bad = [n for n, p in params.items() if not torch.isfinite(p.grad).all()]
    if bad:
        raise _fail(pm, "gradients", f"non-finite gradient in {', '.join(bad)}")
    if params and all(not p.grad.any() for p in params.values()):
        raise _fail(pm, "gradients", "every gradient of the plugin's parameters is zero")
    pm.model.zero_grad(set_to_none=True)


def check_causal(pm: PluginModel, input_ids: torch.Tensor, max_ratio: float = 1e-4) -> None:
    """In a causal LM, changing the last token leaves every earlier position's logits
    as they were (up to rounding: at most `max_ratio` of the change at the last one)."""
    if not pm.model.objective.causal:
        raise _fail(pm, "causal", f"the topology is not a causal LM (objective {pm.model.objective.name})")
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % int(pm.cfg.model.vocab_size)
    with torch.no_grad():
        before, after = pm.model(input_ids).logits, pm.model(changed).logits
    last = (after[:, -1] - before[:, -1]).abs().max().item()
    earlier = (after[:, :-1] - before[:, :-1]).abs().max().item()
    if last == 0:
        raise _fail(pm, "causal", "changing the last token changed nothing, not even its own logits")
    if earlier > max_ratio * last:
        raise _fail(pm, "causal", f"changing the last token changed earlier logits by {earlier:.3g} "
                                  f"(its own by {last:.3g}): a query sees a later key")


def _short(exc: BaseException, lines: int = 25) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return "\n".join(text[:lines] + (["..."] if len(text) > lines else []))


def shared_graphs(pm: PluginModel) -> Optional[int]:
    """How many graphs regional compilation should make: one per stack of repeated
    blocks (an encoder and a decoder differ), or None when a layer pattern makes
    some blocks differ on purpose."""
    if resolve_spec(pm.cfg).model.layer_pattern:
        return None
    return sum(1 for name, m in pm.model.named_modules()
               if name.rpartition(".")[2] == "blocks" and isinstance(m, nn.ModuleList))


def check_compiled(pm: PluginModel, input_ids: torch.Tensor, whole: bool = False,
                   rtol: float = 1e-5, atol: float = 1e-5, max_graphs: Optional[int] = None) -> float:
    """Compile a copy of the model with fullgraph=True, regionally (`llmarch_compose.compile`)
    or whole (`torch.compile`), and compare its logits, loss and every parameter's
    gradient with eager. Returns the largest difference seen. Regionally, at most
    `max_graphs` graphs may be compiled (one graph serves every layer). Dynamo is reset
    first, so earlier graphs do not count against its recompile limit."""
    how = "whole-model torch.compile" if whole else "regional llmarch_compose.compile"
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = pm.model, copy.deepcopy(pm.model)
    runner = torch.compile(compiled, fullgraph=True) if whole else compile_model(compiled, mode="default")
    targets = _targets(pm, input_ids)
    eager.zero_grad(set_to_none=True)
    out_e = eager(input_ids)
    loss_of(out_e, targets).backward()
    try:
        out_c = runner(input_ids)
        loss_c = loss_of(out_c, targets)
        loss_c.backward()
    except Exception as exc:  # a graph break under fullgraph=True, or a compiler failure
        raise _fail(pm, how, f"failed with fullgraph=True:\n{_short(exc)}") from exc
    graphs = counters["stats"]["unique_graphs"]
    if not whole and max_graphs is not None and graphs > max_graphs:
        raise _fail(pm, how, f"compiled {graphs} graphs where {max_graphs} should serve every layer: Dynamo "
                             "specialized on something that differs between layers (a Python number attribute, "
                             "say); keep per-layer values in tensors (a buffer)")
    worst = 0.0

    def compare(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
        nonlocal worst
        worst = max(worst, (a.float() - b.float()).abs().max().item() if a.numel() else 0.0)
        try:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        except AssertionError as exc:
            raise _fail(pm, how, f"{what} differs from eager:\n{exc}") from None

    compare(out_c.logits, out_e.logits, "logits")
    if (out_c.aux_loss is None) != (out_e.aux_loss is None):
        raise _fail(pm, how, "the auxiliary loss is present in one run and absent in the other")
    if out_e.aux_loss is not None:
        compare(out_c.aux_loss, out_e.aux_loss, "the auxiliary loss")
    named_c = dict(compiled.named_parameters())
    for name, p in eager.named_parameters():
        q = named_c[name]
        if (p.grad is None) != (q.grad is None):
            raise _fail(pm, how, f"the gradient of {name} exists in one run only")
        if p.grad is not None:
            compare(q.grad, p.grad, f"the gradient of {name}")
    eager.zero_grad(set_to_none=True)
    return worst


def check_decoding(pm: PluginModel, input_ids: torch.Tensor, split: Optional[int] = None,
                   atol: float = 1e-5) -> float:
    """Generation's path through the plugin: a prefill of `split` tokens (half, by default),
    then one token per step through the decoding state its attention declares, gives the
    logits of the full forward, within `atol`, in a causal LM. Returns the largest difference."""
    model = pm.model
    if model.objective is not CAUSAL_LM or getattr(model, "prefix_lm", False):
        raise _fail(pm, "decoding", f"the check decodes a causal LM; this topology's objective is "
                                    f"{model.objective.name}")
    b, t = input_ids.shape
    split = t // 2 if split is None else split
    with torch.no_grad():
        full = model(input_ids).logits
        try:
            state = model.new_decode_state(b, t)
            parts = [model.decode_step(input_ids[:, :split], state, all_logits=True).logits]
            parts += [model.decode_step(input_ids[:, i:i + 1], state, all_logits=True).logits for i in range(split, t)]
        except LlmarchError as exc:  # a plugin without a decoding state, refused by name
            raise _fail(pm, "decoding", str(exc)) from exc
        except Exception as exc:  # noqa: BLE001 - any failure of the plugin's cached path is the finding
            raise _fail(pm, "decoding", f"cached decoding raised {_short(exc)}") from exc
    error = (torch.cat(parts, dim=1) - full).abs()
    worst = error.max().item()
    if not worst <= atol:
        first = int((error.amax(dim=(0, 2)) > atol).nonzero()[0])
        raise _fail(pm, "decoding", f"cached decoding differs from the full forward by {worst:.3g} (first at "
                                    f"position {first}; the prefill holds {split}): the cache is not what the "
                                    f"plugin attends over without it")
    return worst


def check_plugin(group: str, choice: str, overrides: Sequence[str] = (), *, batch: int = 2, seq_len: int = 8,
                 causal: Optional[bool] = None, compiled: bool = True, decoding: bool = False,
                 rtol: float = 1e-5, atol: float = 1e-5, seed: int = 0) -> PluginReport:
    """Every check on a tiny model with `group=choice`: shapes, gradients, causality
    (by default when the topology is a causal LM), with `decoding` cached decoding against
    the full forward (an attention plugin that declares a decoding state) and, when
    `compiled`, regional and whole-model compilation against eager. Raises
    PluginCheckError on the first failure."""
    pm = build_with(group, choice, overrides, seed=seed)
    ids = pm.input_ids(batch, seq_len)
    report = PluginReport(pm.label, len(pm.instances), sum(p.numel() for p in pm.parameters().values()))
    check_shapes(pm, ids)
    report.checks.append("shapes")
    check_gradients(pm, ids)
    report.checks.append("gradients")
    if causal if causal is not None else pm.model.objective.causal:
        check_causal(pm, ids)
        report.checks.append("causal")
    if decoding:
        check_decoding(pm, ids, atol=atol)
        report.checks.append("decoding")
    if compiled:
        for whole in (False, True):
            how = "whole" if whole else "regional"
            report.compiled_max_diff[how] = check_compiled(pm, ids, whole=whole, rtol=rtol, atol=atol,
                                                           max_graphs=shared_graphs(pm))
            report.checks.append(f"compiled ({how})")
    return report


@contextmanager
def temporary_plugins() -> Iterator[None]:
    """Plugins registered inside the block are gone after it (registry and ConfigStore
    alike), so a test can register variants of its plugin without leaking them."""
    plugins.discover()
    saved = {g: dict(plugins._registry[g]) for g in plugins.GROUPS}
    repo = ConfigStore.instance().repo
    saved_store = {g: dict(repo.get(g, {})) for g in plugins.GROUPS}
    try:
        yield
    finally:
        for g in plugins.GROUPS:
            plugins._registry[g].clear()
            plugins._registry[g].update(saved[g])
            repo.setdefault(g, {}).clear()
            repo[g].update(saved_store[g])


# ----------------------------------------------------------- discovery, end to end


def write_distribution(site: Path, dist: str, files: Mapping[str, str], entry_points: Mapping[str, str],
                       version: str = "0.1") -> None:
    """An installed distribution in folder `site` (put it on PYTHONPATH): its files
    (relative path -> text) and a dist-info declaring `entry_points` (name -> module)
    in the `llmarch_compose.plugins` group, as `pip install --target site` would leave it."""
    site = Path(site)
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {module}\n" for name, module in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{plugins.ENTRY_POINT_GROUP}]\n{lines}")


def run_module(module: str, args: Sequence[str], pythonpath: Sequence[Path] = (), cwd: Optional[Path] = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m <module> *args` in a subprocess with `pythonpath` in front of
    PYTHONPATH (where a plugin distribution was installed); output captured as text."""
    env = dict(os.environ)
    paths = [str(p) for p in pythonpath] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_llmarch(args: Sequence[str], pythonpath: Sequence[Path] = (), cwd: Optional[Path] = None,
                timeout: float = 300) -> subprocess.CompletedProcess:
    """The `llmarch` command (`python -m llmarch_compose *args`) in a subprocess."""
    return run_module("llmarch_compose", args, pythonpath, cwd, timeout)


__all__ = [
    "TINY_MODEL", "PluginCheckError", "PluginModel", "PluginReport",
    "build_with", "check_shapes", "check_gradients", "check_causal", "check_compiled", "check_decoding",
    "check_plugin",
    "shared_graphs",
    "loss_of", "temporary_plugins", "write_distribution", "run_module", "run_llmarch",
]
