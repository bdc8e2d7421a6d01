"""Every preset: exact published parameter counts on meta, and at scale=tiny a model
that runs forward and backward and compiles with fullgraph=True to the same numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose.config.compose import presets
from llmarch_compose.model.card import architecture_card
from llmarch_compose.config.layer_patterns import LAYER_GROUPS, STACKS
from llmarch_compose.config.spec import resolve_spec
from preset_cases import DISTINCT_AT_TINY, SAME_AT_TINY

# Published totals: the model with its LM or MLM head, tied tensors once, buffers excluded.
PUBLISHED = {
    "gpt2": 124_439_808, "gpt2_xl": 1_557_611_200, "gpt3": 174_604_259_328,
    "llama2_7b": 6_738_415_616, "llama2_13b": 13_015_864_320, "llama2_70b": 68_976_648_192,
    "llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496, "llama3_1_405b": 405_853_388_800,
    "qwen2_0_5b": 494_032_768, "qwen2_1_5b": 1_543_714_304, "qwen2_7b": 7_615_616_512, "qwen2_72b": 72_706_203_648,
    "qwen3_8b": 8_190_735_360, "qwen3_30b_a3b": 30_532_122_624,
    "chatglm_6b": 6_173_286_400, "chatglm3_6b": 6_243_584_000,
    "baichuan2_7b": 7_505_973_248, "baichuan2_13b": 13_896_668_160,
    "mistral_7b": 7_241_732_096, "mixtral_8x7b": 46_702_792_704, "pythia_1_4b": 1_414_647_808,
    "gemma_2b": 2_506_172_416, "gemma2_9b": 9_241_705_984,
    "bert_base": 109_514_298, "bert_large": 335_174_458, "roberta_base": 124_697_433, "albert_base": 11_221_680,
    "t5_small": 60_506_624, "t5_base": 222_903_552, "t5_large": 737_668_096, "t5_3b": 2_851_598_336,
    "t5_11b": 11_307_321_344, "flan_t5_base": 247_577_856, "switch_base_8": 619_339_008,
    "deepseek_v3": 671_026_404_352, "bart_base": 139_420_416,
    "distilbert_base": 66_985_530, "xlm_roberta_base": 278_295_186,
    # OLMo-7B-hf and OLMo-2-1124-7B: their model pages give 6.89B and 7.3B; the exact totals are the
    # tensor shapes of their config.json files summed (OLMo-1's norms have no parameters).
    "olmo_7b": 6_888_095_744, "olmo2_7b": 7_298_617_344,
    # Phi-3-mini-4k-instruct and phi-4: their model pages give 3.82B and 14.7B; the exact totals are the
    # tensor shapes of their config.json files summed.
    "phi3_mini": 3_821_079_552, "phi4": 14_659_507_200,
    # SmolLM3-3B: its model page gives 3.08B; the exact total is the tensor shapes of its config.json summed.
    "smollm3_3b": 3_075_098_624,
    # Phi-2: the Hub's safetensors count of microsoft/phi-2 (F16: 2,779,683,840).
    "phi2": 2_779_683_840,
    # Falcon-7B: the Hub's safetensors count of tiiuae/falcon-7b, 7,217,189,760, stores the tied
    # head a second time; less that copy (65,024 x 4,544) it is the count its config.json implies.
    "falcon_7b": 6_921_720_704,
    "gemma3_4b": 3_880_263_168, "modernbert_base": 149_655_232,
    # openai/gpt-oss-20b: the card rounds to 20.9B; exact from its config.json (checked by hand).
    "gpt_oss_20b": 20_914_757_184,
    # deepseek-ai/DeepSeek-V2-Lite: the card rounds to 15.7B; exact from its config.json (checked by hand).
    "deepseek_v2_lite": 15_706_484_224,
    # google/mt5-base: the model page's 582M; flan_t5_base's count with 217,984 more rows in each of
    # the token table and the head.
    "mt5_base": 582_401_280,
}
# Gemma-3-4B, its language model alone: 671,252,480 embedding (262,208 x 2,560) + 3,209,010,688
# other parameters; the Gemma 3 technical report (Table 1) gives 3,209M non-embedding parameters
# (and 417M for the vision encoder, not part of this preset).
# ModernBERT-base: 149M parameters (answerdotai/ModernBERT-base model card), exactly the sum of
# the tensors of its ModernBertForMaskedLM checkpoint with the decoder tied.
# Qwen3-30B-A3B: the total less 120 of 128 experts (3 x 2048 x 768 each) in each of 48 layers.
# gpt-oss-20b: the total less 28 of 32 experts in each of 24 layers; the card's 3.6B leaves out
# the input embedding (this less 201088 x 2880 = 3,608,307,264).
# DeepSeek-V2-Lite: the total less 58 of 64 experts in each of 26 layers; the card's 2.4B leaves out
# the input embedding (this less 102400 x 2048 = 2,451,435,008).
PUBLISHED_ACTIVE = {"mixtral_8x7b": 12_879_925_248, "qwen3_30b_a3b": 3_353_032_704,
                    "gpt_oss_20b": 4_187_440_704, "deepseek_v2_lite": 2_661_150_208}

PRESETS = presets()


def test_every_named_preset_exists():
    assert set(PUBLISHED) <= set(PRESETS), set(PUBLISHED) - set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_count(name):
    if name not in PRESETS:
        pytest.fail(f"preset {name} is missing")
    spec = lc.resolve_spec(lc.compose([f"model={name}"]))
    card = architecture_card(spec)
    assert card["params_total"] == PUBLISHED[name]
    if name in PUBLISHED_ACTIVE:
        assert card["params_active"] == PUBLISHED_ACTIVE[name]
    model = lc.build(spec, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def layer_kinds(spec) -> set:
    """The distinct layers of a model: (group, plugin, windowed) for each per-layer group."""
    return {tuple((g, spec.params_for(g, i, s).plugin, getattr(spec.params_for(g, i, s), "window", None) is not None)
                  for g in LAYER_GROUPS)
            for s in STACKS for i in range(spec.model.n_layers)}


def _inputs(model, generator):
    ids = torch.randint(0, 512, (2, 24), generator=generator)
    if model.objective is lc.SEQ2SEQ:
        return (ids, torch.randint(0, 512, (2, 16), generator=generator))
    return (ids,)


def _loss(out):
    loss = out.logits.float().logsumexp(-1).mean()
    return loss + out.aux_loss if out.aux_loss is not None else loss


def tiny_spec_without_name(name: str):
    spec = resolve_spec(lc.compose([f"model={name}", "scale=tiny"]))
    return dataclasses.replace(spec, model=dataclasses.replace(spec.model, name=""))


@pytest.mark.slow  # what it proves serves the compiled checks, which are slow too
@pytest.mark.parametrize("twin", sorted(SAME_AT_TINY))
def test_presets_left_out_of_compiled_checks_are_identical_at_tiny(twin):
    assert tiny_spec_without_name(twin) == tiny_spec_without_name(SAME_AT_TINY[twin])


def shallowest_tiny(name: str, full):
    """scale=tiny at the fewest layers that keep every kind of layer `full` has, two at least
    (so that a layer feeds another): compiling the whole model costs about a graph per layer."""
    for depth in (2, 3):
        cfg = lc.compose([f"model={name}", "scale=tiny", f"scale.n_layers={depth}"])
        if layer_kinds(lc.resolve_spec(cfg)) == layer_kinds(full):
            return cfg
    return lc.compose([f"model={name}", "scale=tiny"])


@pytest.mark.slow
@pytest.mark.parametrize("name", DISTINCT_AT_TINY)
def test_tiny_preset_trains_and_compiles_to_eager(name):
    full = lc.resolve_spec(lc.compose([f"model={name}"]))
    cfg = shallowest_tiny(name, full)
    spec = lc.resolve_spec(cfg)
    # scale=tiny keeps every component, and every kind of layer the pattern makes.
    assert spec.components == full.components
    assert layer_kinds(spec) == layer_kinds(full)
    torch.manual_seed(0)
    model = lc.build(spec)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    args = _inputs(model, torch.Generator().manual_seed(1))
    eager = model(*args)
    _loss(eager).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(*args)
    torch.testing.assert_close(out.logits, eager.logits, atol=1e-5, rtol=1e-4)
    _loss(out).backward()
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-4, msg=lambda m: f"{n}: {m}")
