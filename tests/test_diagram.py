"""The architecture diagram (`task=diagram`): its content read from the built model and the
spec (model/anatomy.py), checked against the spec's own per-layer choices and against the
card's exact parameter count; the drawing (model/diagram.py) renders as SVG whose text
names what the card names, and as PNG."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from omegaconf import SI
from torch import nn

import llmarch_compose as lc
from llmarch_compose import Norm, register
from llmarch_compose.config.compose import presets
from llmarch_compose.config.layer_patterns import LAYER_GROUPS
from llmarch_compose.model.anatomy import Anatomy, describe, layer_set, settings
from llmarch_compose.model.card import architecture_card
from llmarch_compose.model.diagram import COLUMN, MARGIN, render
from llmarch_compose.plugin import registry as plugins
from llmarch_compose.tasks import run_task
from llmarch_compose.testing import TINY_MODEL, temporary_plugins
from llmarch_compose.train import loop

# Six layers: a window on the odd ones, experts from layer 4 on -> four kinds of layer.
HYBRID = [*TINY_MODEL, "model.n_layers=6", "model.n_experts=4", "model.tie_embeddings=false",
          "model.layer_pattern=[{every: 2, offset: 1, attention: {window: 8}}, {start: 4, ffn: moe}]"]


def anatomy_of(*overrides: str) -> tuple[lc.ModelSpec, Anatomy]:
    spec = lc.resolve_spec(lc.compose(list(overrides)))
    return spec, describe(spec)


@pytest.fixture(scope="module")
def hybrid():
    return anatomy_of(*HYBRID)


@pytest.fixture(scope="module")
def t5():
    return anatomy_of("model=t5_small", "scale=tiny")


def svg_text(svg: bytes) -> str:
    """Every text of the drawing (the SVG keeps text as text), one line per element."""
    root = ET.fromstring(svg)  # well-formed XML, or this raises
    return "\n".join("".join(e.itertext()) for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "text")


def counted(a: Anatomy) -> int:
    """Every parameter the anatomy shows, each kind's once per layer (a shared block once)."""
    total = sum(p.params for box in a.outputs for p in box.parts)
    for stack in a.stacks:
        total += sum(p.params for box in stack.inputs for p in box.parts) + sum(p.params for p in stack.after)
        total += sum(kind.params * (1 if kind.runs > 1 else len(kind.layers)) for kind in stack.kinds)
    return total


def spec_kinds(spec, stack: str) -> list[tuple]:
    """Each layer's per-layer params as the spec resolves them, and whether the topology leaves
    out its attention norm (ModernBERT's first layer: `topology.first_attn_norm=false`)."""
    bare_first = not getattr(spec.params["topology"], "first_attn_norm", True)
    return [(*(spec.params_for(g, i, stack) for g in LAYER_GROUPS), bare_first and i == 0)
            for i in range(spec.model.n_layers)]


def assert_kinds_follow_the_spec(spec, a: Anatomy) -> None:
    """Layers are one kind exactly when the spec gives them the same params."""
    for stack in a.stacks:
        layers = spec_kinds(spec, stack.name)
        for i in range(len(layers)):
            for j in range(len(layers)):
                assert (stack.layer_kind[i] == stack.layer_kind[j]) == (layers[i] == layers[j]), (stack.name, i, j)


# --------------------------------------------------------------------------- formatting

def test_layer_sets_are_named_compactly():
    assert layer_set(range(32)) == "layers 0-31"
    assert layer_set([7]) == "layer 7"
    assert layer_set(range(1, 96, 2)) == "layers 1, 3, ..., 95 (every 2nd)"
    assert layer_set([3, 7, 11, 15]) == "layers 3, 7, ..., 15 (every 4th)"
    assert layer_set([0, 1, 2, 5, 8, 9]) == "layers 0-2, 5, 8-9"
    assert layer_set([0, 4]) == "layers 0, 4"


def test_settings_show_sizes_and_whatever_differs_from_its_default():
    @dataclass
    class Params:
        plugin: str = "p"
        name: str = "p"
        heads: int = SI("${model.n_kv_heads}")  # a size: always shown
        groups: int = SI("${model.n_expert_groups}")  # 1, its schema default: off
        eps: float = SI("${model.norm_eps}")
        router: str = "softmax"
        bias: bool = False
        window: Optional[int] = None
        brand_new_knob: float = 0.0  # a field nothing here has heard of

    as_composed = Params(heads=2, groups=1, eps=1e-5)  # the interpolations resolved at the schema's numbers
    assert settings(as_composed) == [("heads", "heads 2")]
    changed = Params(heads=8, groups=4, eps=1e-6, router="sigmoid", bias=True, window=256, brand_new_knob=0.5)
    assert [t for _, t in settings(changed)] == ["heads 8", "groups 4", "eps 1e-06", "router sigmoid", "bias",
                                                  "window 256", "brand_new_knob 0.5"]


# --------------------------------------------------------------------------- what the anatomy holds

def test_a_hybrid_has_one_kind_per_distinct_layer(hybrid):
    spec, a = hybrid
    (stack,) = a.stacks
    assert stack.name == "decoder" and stack.attends == "causal" and stack.reads is None
    assert stack.layer_kind == (0, 1, 0, 1, 2, 3)
    assert [(k.letter, k.layers) for k in stack.kinds] == [("A", (0, 2)), ("B", (1, 3)), ("C", (4,)), ("D", (5,))]
    assert_kinds_follow_the_spec(spec, a)
    by_name = [{p.name: p for p in kind.parts} for kind in stack.kinds]
    assert [p["attn"].title.startswith("SWA+") for p in by_name] == [False, True, False, True]
    assert [p["attn"].changed for p in by_name] == [False, True, False, True]  # set by the pattern's rule
    assert "window 8" in by_name[1]["attn"].notes and "2 KV heads" in by_name[0]["attn"].notes
    assert "4 heads × 8" in by_name[0]["attn"].notes
    assert [p["ffn"].moe for p in by_name] == [False, False, True, True]
    moe = by_name[2]["ffn"]
    assert moe.changed and {"num_experts 4", "top_k 2", "hidden 48", "activation SwiGLU"} <= set(moe.notes)
    assert moe.active is not None and 0 < moe.active < moe.params
    dense = by_name[0]["ffn"]
    assert "hidden 48" in dense.notes and dense.active is None and not dense.changed
    # Pre-norm: the norm before each sublayer, the residual added after it.
    assert [(p.name, p.residual_after) for p in stack.kinds[0].parts] == [
        ("attn_norm", False), ("attn", True), ("ffn_norm", False), ("ffn", True)]
    assert [p.name for p in stack.after] == ["final_norm"]
    assert any("model.layer_pattern[0]" in o and "window: 8" in o for o in a.options)


def test_every_parameter_is_shown_once(hybrid, t5):
    for spec, a in (hybrid, t5):  # the total: the card's count of the same model (tied tables once)
        assert counted(a) == a.params_total == architecture_card(spec)["params_total"]


def test_the_embeddings_position_and_head(hybrid):
    _, a = hybrid
    (embed,) = a.stacks[0].inputs
    names = {p.name: p for p in embed.parts}
    assert names["tokens"].title == "Embedding 64 × 32"
    assert names["position"].title == "RoPE" and "rotates q and k in every attention layer" in names["position"].notes
    (head,) = a.outputs
    assert head.notes[0] == "not tied to the token table" and head.parts[0].title == "parameter 64 × 32"
    assert head.parts[0].params == 64 * 32


def test_an_encoder_decoder_shows_both_stacks_and_the_cross_attention(t5):
    spec, a = t5
    encoder, decoder = a.stacks
    assert (encoder.name, encoder.attends, encoder.reads) == ("encoder", "bidirectional", None)
    assert (decoder.name, decoder.attends, decoder.reads) == ("decoder", "causal", "encoder")
    assert [p.name for p in encoder.kinds[0].parts] == ["attn_norm", "attn", "ffn_norm", "ffn"]
    parts = {p.name: p for p in decoder.kinds[0].parts}
    assert [p.name for p in decoder.kinds[0].parts] == ["attn_norm", "attn", "cross_norm", "cross_attn", "ffn_norm",
                                                         "ffn"]
    assert "cross-attention" in parts["cross_attn"].notes and "causal" in parts["attn"].notes
    assert [p.name for p in decoder.kinds[0].parts if p.cross] == ["cross_attn"]
    assert [b.name for b in encoder.inputs] == ["encoder_embed"] and [b.name for b in decoder.inputs] == ["embed"]
    tokens = {p.name: p for p in decoder.inputs[0].parts}["tokens"]
    assert tokens.notes == ("shared with encoder_embed.tokens",) and tokens.params == 0
    positions = [next(p for p in s.inputs[0].parts if p.group == "position") for s in a.stacks]
    assert [p.name for p in positions] == ["encoder_position", "position"]  # one bias table per stack
    assert "biases the attention scores in every layer" in positions[0].notes
    (head,) = a.outputs
    assert head.parts[0].title == "tied to encoder_embed.tokens" and "scale_tied_head" in head.notes
    assert_kinds_follow_the_spec(spec, a)


def test_shared_layers_and_post_norm():
    spec, a = anatomy_of("model=albert_base", "scale=tiny")
    (stack,) = a.stacks
    (kind,) = stack.kinds
    assert kind.runs == spec.model.n_layers and kind.layers == tuple(range(spec.model.n_layers))
    assert "share_layers" in stack.notes and "norm_position post" in stack.notes
    # Post-norm: norm(x + f(x)), so each norm comes after its sublayer's residual add.
    assert [(p.name, p.residual_after) for p in kind.parts] == [
        ("attn", True), ("attn_norm", False), ("ffn", True), ("ffn_norm", False)]
    assert all("post" in p.notes for p in kind.parts if p.group == "norm")
    embed = {p.name: p for p in stack.inputs[0].parts}
    width = spec.model.embedding_dim
    assert embed["project"].title == f"Linear {width} → {spec.model.d_model} + bias"  # factorized embeddings
    assert embed["token_types"].title == f"Embedding 2 × {width}"
    assert counted(a) == a.params_total


# --------------------------------------------------------------------------- what it has never heard of

@dataclass
class KitNormParams:
    gain_init: float = 1.0


class KitNorm(Norm):
    """A norm of a third-party package."""

    def __init__(self, params: KitNormParams, ctx, dim=None):
        super().__init__()
        self.weight = nn.Parameter(torch.full((dim or ctx.model.d_model,), params.gain_init))

    def forward(self, x):
        return x * self.weight


class KitFlat(lc.Topology):
    """A topology of a third-party package that builds no LayerStack."""

    def __init__(self, params, ctx):
        super().__init__()
        self.position = ctx.position
        self.lookup = nn.Embedding(ctx.model.vocab_size, ctx.model.d_model)
        self.mix = nn.Linear(ctx.model.d_model, ctx.model.d_model)


def test_sandwich_norms_and_the_logit_cap():
    spec, a = anatomy_of("model=gemma2_9b", "scale=tiny")
    (stack,) = a.stacks
    assert "norm_position sandwich" in stack.notes and len(stack.kinds) == 2  # sliding and full layers
    # x + norm(f(norm(x))): the residual add follows the norm after each sublayer.
    assert [(p.name, p.residual_after) for p in stack.kinds[0].parts] == [
        ("attn_norm", False), ("attn", False), ("attn_post_norm", True), ("ffn_norm", False), ("ffn", False),
        ("ffn_post_norm", True)]
    assert "final_logit_softcap 30" in a.outputs[0].notes and "scale_embeddings" in stack.inputs[0].notes
    assert counted(a) == a.params_total


def test_norms_on_the_sublayer_outputs():
    spec, a = anatomy_of("scale=tiny", "topology.norm_position=post_output")
    (stack,) = a.stacks
    assert "norm_position post_output" in stack.notes
    # x + norm(f(x)): each norm follows its sublayer, and the residual add follows the norm.
    assert [(p.name, p.residual_after) for p in stack.kinds[0].parts] == [
        ("attn", False), ("attn_norm", True), ("ffn", False), ("ffn_norm", True)]
    assert counted(a) == a.params_total


def test_a_third_party_plugin_and_new_topology_options_show_by_name():
    from llmarch_compose.registry.topology.decoder_only import DecoderOnly
    from llmarch_compose.registry.topology.stack import TopologyParams

    @dataclass
    class KitTopologyParams(TopologyParams):
        logit_softcap: Optional[float] = None
        mystery_knob: int = 0

        def validate(self, model, key):  # accepts a placement the built-in topologies do not know
            pass

    with temporary_plugins():
        register("norm", "kit_norm", params=KitNormParams)(KitNorm)
        register("topology", "kit_topology", params=KitTopologyParams)(
            type("KitTopology", (DecoderOnly,), {"__module__": __name__}))
        spec, a = anatomy_of(*TINY_MODEL, "norm=kit_norm", "norm.gain_init=0.5", "topology=kit_topology",
                             "topology.logit_softcap=30", "topology.mystery_knob=3", "topology.norm_position=middle")
        # A topology of its own making, with no LayerStack: its children, one box each.
        register("topology", "kit_flat", params=KitTopologyParams)(KitFlat)
        _, flat = anatomy_of(*TINY_MODEL, "topology=kit_flat")
        flat_svg = svg_text(render(flat, "svg"))
    (stack,) = a.stacks
    norms = [p for p in stack.kinds[0].parts if p.group == "norm"]
    assert [p.title for p in norms] == ["kit_norm", "kit_norm"] and all("gain_init 0.5" in p.notes for p in norms)
    assert all("middle" in p.notes for p in norms)  # a placement it does not know: named, in build order,
    assert [p.name for p in stack.kinds[0].parts] == ["attn_norm", "attn", "ffn_norm", "ffn"]
    assert not any(p.residual_after for p in stack.kinds[0].parts)  # and no residual add drawn where unknown
    assert "mystery_knob 3" in stack.notes and "norm_position middle" in stack.notes
    assert "logit_softcap 30" in a.outputs[0].notes  # an option of the head goes to the head
    assert flat.stacks == () and [b.name for b in flat.outputs] == ["position", "lookup", "mix"]
    assert counted(flat) == flat.params_total and "Linear 32 → 32 + bias" in flat_svg
    words = a.words()  # what the drawing writes (the SVG tests below check that it writes them)
    for text in ("kit_norm", "gain_init 0.5", "mystery_knob 3", "logit_softcap 30", "kit_topology"):
        assert any(text in w for w in words), text


# --------------------------------------------------------------------------- the drawing

def test_the_svg_names_every_component_and_kind_and_the_png_renders(hybrid):
    spec, a = hybrid
    text = svg_text(render(a, "svg"))
    for group, choice in spec.components.items():
        assert f"{group}\u00a0{choice}" in text and spec.params[group].plugin in text
    for kind in a.stacks[0].kinds:
        assert layer_set(kind.layers) in text
        assert all(p.name in text for p in kind.parts)
    assert "SWA+GQA" in text and "set by model.layer_pattern" in text and "num_experts 4" in text
    assert all(w in text for w in a.words() if len(w) < 60)  # every short text whole (long notes wrap)


def test_the_task_writes_svg_and_png(tmp_path, capsys):
    out = tmp_path / "fig"
    result = run_task(lc.compose([*TINY_MODEL, "task=diagram", f"task.output={out}"]))
    assert result == {"svg": str(out / "diagram.svg"), "png": str(out / "diagram.png")}
    text = svg_text((out / "diagram.svg").read_bytes())
    assert "decoder stack" in text and "layers 0-1" in text
    png = (out / "diagram.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width == round((COLUMN + 2 * MARGIN) * 110) and height > 300  # one column, at 110 dpi
    assert str(out / "diagram.svg") in capsys.readouterr().out


def test_a_failed_drawing_is_named_on_stderr_and_not_raised(hybrid, tmp_path, monkeypatch, capsys):
    def broken(spec, folder):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(loop, "write_diagram", broken)
    loop.draw_diagram(hybrid[0], tmp_path)
    assert "llmarch: could not draw the diagram: RuntimeError: no fonts" in capsys.readouterr().err


@pytest.mark.slow
def test_a_training_run_draws_unless_asked_not_to_and_survives_a_failed_drawing(tmp_path, monkeypatch, capsys):
    run = [*TINY_MODEL, "task.steps=1", "task.batch_size=2", "task.seq_len=32", "task.eval_batches=1",
           "task.progress=false", "task.checkpoint=false", "compile=eager", "data=copy"]
    run_task(lc.compose([*run, f"task.output={tmp_path / 'plain'}", "task.diagram=false"]))
    assert (tmp_path / "plain" / "summary.json").exists() and not list((tmp_path / "plain").glob("diagram.*"))

    def broken(spec, folder):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(loop, "write_diagram", broken)
    summary = run_task(lc.compose([*run, f"task.output={tmp_path / 'broken'}"]))
    assert summary["status"] == "completed"  # the run does not depend on its picture
    assert "could not draw the diagram: RuntimeError: no fonts" in capsys.readouterr().err


def test_the_task_is_registered_with_its_output_key():
    info = plugins.get("task", "diagram")
    assert {f for f in info.params.__dataclass_fields__} == {"name", "output"}


# --------------------------------------------------------------------------- every preset

@pytest.mark.slow
@pytest.mark.parametrize("name", presets())
def test_every_preset_renders_and_names_what_its_card_names(name):
    spec = lc.resolve_spec(lc.compose([f"model={name}"]))
    a = describe(spec)
    card = architecture_card(spec)
    assert counted(a) == a.params_total == card["params_total"]
    assert_kinds_follow_the_spec(spec, a)
    text = svg_text(render(a, "svg"))
    for group in plugins.GROUPS:
        assert card["components"][group] in text and card["plugins"][group] in text
    for stack in a.stacks:
        assert f"{stack.name} stack" in text
        assert all(layer_set(kind.layers) in text for kind in stack.kinds)
    assert render(a, "png")[:8] == b"\x89PNG\r\n\x1a\n"
