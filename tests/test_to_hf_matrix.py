"""Every preset (at scale=tiny) written with `to_hf` under every mapped model type, and with
the type left to the guess: either transformers loads the folder with no missing or
unexpected key and computes our logits (fp32, within 1e-4), or `to_hf` refuses with a
ConfigError naming a field. No third outcome. One test walks the whole matrix and lists every
pair that breaks the rule (a test per pair besides it wrote every pair twice).

Besides the presets, a few specs cover the types no preset is (Qwen-MoE, StarCoder2, OPT, GPT-J,
StableLM, Cohere) and the shapes
that were once written silently wrong (a GELU or a parallel residual as LLaMA).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import llmarch_compose as lc  # noqa: E402
from llmarch_compose.plugin import registry as plugins  # noqa: E402
from llmarch_compose.config.compose import presets  # noqa: E402
from llmarch_compose.errors import ConfigError  # noqa: E402
from llmarch_compose.interop import hf  # noqa: E402
from llmarch_compose.interop.hf import to_hf  # noqa: E402
from llmarch_compose.interop.types import MODEL_TYPES  # noqa: E402

pytestmark = pytest.mark.slow

TOL = 1e-4
EXTRA = {
    # 16 experts in DeepSeek's 8 groups: two per group, as DeepSeek rates a group by its best two.
    "deepseek_v3+16_experts": ["model=deepseek_v3", "scale.n_experts=16"],
    "qwen2_moe-like": ["model=mixtral_8x7b", "ffn=qwen_moe", "model.n_shared_experts=1", "model.qkv_bias=true",
                       "model.attention_bias=false"],
    "qwen3_moe-like": ["model=mixtral_8x7b", "model.qk_norm=true", "ffn.normalize_top_k=false",
                       "model.layer_pattern=[{layers:[1],ffn:dense}]"],
    "starcoder2-like": ["model=mistral_7b", "norm=layernorm", "activation=gelu_tanh", "model.attention_bias=true",
                        "model.mlp_bias=true"],
    "opt-like": ["model=gpt2", "activation=relu", "model.position_offset=2"],
    # The shared-norm parallel blocks of the types no preset is written as (GPT-J, StableLM-2, Cohere),
    # and Falcon-40B's two-norm block with grouped key/value heads.
    "gptj-like": ["model=phi2", "model.attention_bias=false", "model.rope_interleaved=true"],
    "stablelm-like": ["model=llama2_7b", "norm=layernorm", "model.rotary_fraction=0.25", "model.qkv_bias=true",
                      "topology.parallel_residual=true", "topology.shared_norm=true"],
    "cohere-like": ["model=llama2_7b", "norm=layernorm", "norm.bias=false", "model.rope_interleaved=true",
                    "attention=gqa", "model.n_kv_heads=8", "topology.parallel_residual=true",
                    "topology.shared_norm=true", "topology.logit_scale=0.0625"],
    "falcon-40b-like": ["model=falcon_7b", "attention=gqa", "model.n_kv_heads=8", "topology.shared_norm=false"],
    "glm4-like": ["model=chatglm3_6b", "topology.norm_position=sandwich"],
    "tiny+gelu": ["model=tiny", "activation=gelu"],
    "tiny+geglu": ["model=tiny", "activation=geglu"],
    "tiny+parallel_residual": ["model=tiny", "topology.parallel_residual=true"],
    "tiny+post_norm": ["model=tiny", "topology.norm_position=post"],
    "tiny+dynamic_rope": ["model=tiny", "model.rope_scaling={type:dynamic,factor:2.0,original_max_seq_len:8}"],
    # The mapped types no preset is written as: BLOOM, MPT, mBART and Marian shapes.
    "bloom-like": ["model=tiny", "position=alibi", "norm=layernorm", "activation=gelu_tanh", "model.n_kv_heads=8",
                   "model.attention_bias=true", "model.qkv_bias=true", "model.mlp_bias=true",
                   "topology.embedding_norm=true", "scale.ffn_dim=256"],
    "mpt-like": ["model=tiny", "position=alibi", "norm=layernorm", "norm.bias=false", "activation=gelu",
                 "model.n_kv_heads=8", "scale.ffn_dim=256"],
    "mbart-like": ["model=bart_base", "topology.norm_position=pre", "topology.scale_embeddings=true"],
    "marian-like": ["model=bart_base", "position=sinusoidal", "position.layout=halves", "activation=silu",
                    "topology.embedding_norm=false", "topology.scale_embeddings=true"],
}
CASES = {**{p: [f"model={p}"] for p in presets()}, **EXTRA}
TYPES = [*MODEL_TYPES, None]
SRC = torch.randint(0, 10_000, (2, 16), generator=torch.Generator().manual_seed(0))
TGT = torch.randint(0, 10_000, (2, 12), generator=torch.Generator().manual_seed(1))
FIELD = re.compile(r"^[a-z_]+(\.[a-z_0-9]+)*$")


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Weights large enough that a wrong mapping shows: norms near 1, routers wide (no
    near ties in top-k), biases, buffers and position tables away from 0."""
    g = torch.Generator().manual_seed(0)
    stored = set(model.state_dict())  # computed buffers (RoPE frequencies, ALiBi slopes) are not drawn
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point() or "inv_freq" in name or name not in stored:
                continue
            noise = torch.randn(t.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                t.copy_(1 + 0.1 * noise)
            elif "router" in name:
                t.copy_(0.5 * noise)
            else:
                t.copy_(0.1 * noise)
    return model.eval()


@functools.lru_cache(maxsize=None)
def built(case: str):
    cfg = lc.compose([*CASES[case], "scale=tiny"])
    torch.manual_seed(0)
    return cfg, randomize(lc.build(cfg, device="cpu"))


def run_ours(model, spec):
    vocab = spec.model.vocab_size
    with torch.no_grad():
        if model.objective is lc.SEQ2SEQ:
            return model(SRC % vocab, TGT % vocab).logits
        return model(SRC % vocab).logits


def run_theirs(model, spec):
    vocab = spec.model.vocab_size
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=SRC % vocab, decoder_input_ids=TGT % vocab).logits
        return model(SRC % vocab).logits


@functools.lru_cache(maxsize=None)
def _written(case: str, model_type: str, folder: str) -> float:
    """Load a written folder with the class config.json names; the max logit difference."""
    cfg, model = built(case)
    spec = lc.resolve_spec(cfg)
    architecture = json.loads((Path(folder) / "config.json").read_text())["architectures"][0]
    back, info = getattr(transformers, architecture).from_pretrained(
        folder, output_loading_info=True, attn_implementation="eager", experts_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return (run_theirs(back.eval(), spec) - run_ours(model, spec)).abs().max().item()


@functools.lru_cache(maxsize=None)
@functools.lru_cache(maxsize=None)  # the guess checks again the type it chose, which the loop also writes
def outcome(case: str, model_type, root: str) -> tuple[str, object]:
    """("written", (type, max diff)) or ("refused", the key)."""
    cfg, model = built(case)
    out = f"{root}/{case}-{model_type or 'guess'}"
    try:
        to_hf(model, cfg, out, model_type=model_type)
    except ConfigError as exc:
        return "refused", exc.key
    written_as = json.loads(Path(out, "config.json").read_text())["model_type"]
    if model_type is None:  # the guess writes what naming that type writes: checked once
        kind, value = outcome(case, written_as, root)
        assert kind == "written", f"the guess wrote {written_as}, which refuses this model by name"
        return "written", value
    return "written", (written_as, _written(case, model_type, out))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("to_hf"))


@pytest.fixture
def resolved_once(monkeypatch):
    """`to_hf` resolves its config on every call; each case's config is one object written
    under every type, so it is resolved once per case (the written folder is unchanged)."""
    specs = {}

    def resolve(cfg):
        if id(cfg) not in specs:
            specs[id(cfg)] = (cfg, lc.resolve_spec(cfg))  # holding cfg keeps its id from being reused
        return specs[id(cfg)][1]

    monkeypatch.setattr(hf, "resolve_spec", resolve)


def test_matrix_counts(root, resolved_once):
    written = {t: 0 for t in MODEL_TYPES}
    refused = {t: 0 for t in MODEL_TYPES}
    guessed, worst, wrong = {}, 0.0, []
    for case in sorted(CASES):
        for model_type in TYPES:
            kind, value = outcome(case, model_type, root)
            if kind == "refused":  # by a field: a group's or the model's key
                if not (FIELD.match(value) and value.split(".")[0] in (*plugins.GROUPS, "model")):
                    wrong.append(f"{case} as {model_type}: refused by {value!r}, not a field")
            elif model_type not in (None, value[0]):
                wrong.append(f"{case} as {model_type}: written as {value[0]}")
            elif value[1] > TOL:
                wrong.append(f"{case} as {value[0]}: logits differ by {value[1]:.3g}")
            if model_type is None:
                guessed[case] = value[0] if kind == "written" else f"refused ({value})"
            elif kind == "written":
                written[model_type] += 1
                worst = max(worst, value[1])
            else:
                refused[model_type] += 1
    print("\nmodel type       written  refused")
    for t in MODEL_TYPES:
        print(f"{t:16} {written[t]:7} {refused[t]:8}")
    print(f"max logit difference written: {worst:.3g}")
    print("guesses:", guessed)
    assert not wrong, "\n".join(wrong)
    assert worst <= TOL  # zero silent ones: every written pair computes our logits
    assert all(written.values()), written  # each type's own family round-trips
    assert guessed["baichuan2_7b"].startswith("refused") and guessed["tiny+parallel_residual"].startswith("refused")
