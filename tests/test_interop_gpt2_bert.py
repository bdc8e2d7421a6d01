"""Hugging Face interop for GPT-2 (GPT2LMHeadModel) and BERT (BertForMaskedLM): logits
parity with transformers on the same random weights, eager and compiled, round trips
that transformers loads without a missing or unexpected key, the on-disk quirks of older
checkpoints, and errors that name the tensor or field."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import InteropError, from_hf, to_hf
from llmarch_compose.interop.types import guess_type

GPT2 = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
BERT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=128,
            max_position_embeddings=64)
CASES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict(GPT2)),
    # n_inner set, its own head, unscaled attention scores, exact GELU
    "gpt2_variant": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
                     dict(GPT2, n_inner=96, tie_word_embeddings=False, scale_attn_weights=False,
                          activation_function="gelu")),
    "bert": (transformers.BertConfig, transformers.BertForMaskedLM, dict(BERT)),
    "bert_untied": (transformers.BertConfig, transformers.BertForMaskedLM,
                    dict(BERT, tie_word_embeddings=False, hidden_act="gelu_new", type_vocab_size=3)),
}
AUTO = {transformers.GPT2LMHeadModel: transformers.AutoModelForCausalLM,
        transformers.BertForMaskedLM: transformers.AutoModelForMaskedLM}

IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
TYPES = torch.randint(0, 2, (2, 24), generator=torch.Generator().manual_seed(1))


def hf_model(case: str, model_cls=None):
    config_cls, default_cls, extra = CASES[case]
    config = config_cls(**extra)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = (model_cls or default_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # LayerNorm weights around 1, everything else large enough for differences to show.
            if "ln_" in name or "LayerNorm" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.2)
            else:
                p.normal_(0, 0.15)
    return model


def run_ours(model, case):
    return model(IDS, TYPES).logits if case.startswith("bert") else model(IDS).logits


def run_theirs(model, case):
    return model(IDS, token_type_ids=TYPES).logits if case.startswith("bert") else model(IDS).logits


@pytest.fixture(scope="module", params=list(CASES))
def converted(request):
    hf = hf_model(request.param)
    cfg, model = from_hf(hf)
    return request.param, hf, cfg, model.eval()


@pytest.fixture
def transformers_warnings(caplog):
    """transformers' own log records (its library logger does not propagate by default)."""
    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            yield caplog
    finally:
        transformers.logging.disable_propagation()


def test_logits_match_transformers(converted):
    case, hf, _, model = converted
    with torch.no_grad():
        torch.testing.assert_close(run_ours(model, case), run_theirs(hf, case), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_logits_match_transformers(converted):
    case, hf, _, model = converted
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(run_ours(compiled, case), run_theirs(hf, case), atol=1e-4, rtol=0)


def test_round_trip_loads_cleanly_in_transformers(converted, tmp_path, transformers_warnings):
    case, hf, cfg, model = converted
    out = to_hf(model, cfg, tmp_path / "out")
    back, info = AUTO[type(hf)].from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    # Untied, transformers 5 keeps cls.predictions.bias beside the decoder's own bias but
    # never reads it; our one head bias is written under both names, so no key is missing.
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not [r for r in transformers_warnings.records if "LOAD REPORT" in r.getMessage()]
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(run_theirs(back.eval(), case), run_theirs(hf, case), atol=1e-4, rtol=0)
    # ... and back into ours: the same config and the same tensors.
    again_cfg, again = from_hf(out)
    assert lc.resolve_spec(again_cfg).params == lc.resolve_spec(cfg).params
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_config_maps_onto_groups_and_numbers():
    spec = lc.resolve_spec(from_hf(hf_model("gpt2"))[0])
    assert spec.components == {"position": "learned", "norm": "layernorm", "activation": "gelu_tanh",
                               "attention": "mha", "ffn": "dense", "topology": "decoder_only"}
    assert spec.model.ffn_dim == 4 * 64 and spec.model.tie_embeddings and spec.params["attention"].scale is None
    spec = lc.resolve_spec(from_hf(hf_model("gpt2_variant"))[0])
    assert spec.model.ffn_dim == 96 and not spec.model.tie_embeddings and spec.params["attention"].scale == 1.0
    assert spec.components["activation"] == "gelu" and spec.params["activation"].approximate == "none"
    spec = lc.resolve_spec(from_hf(hf_model("bert"))[0])
    assert spec.components["topology"] == "encoder_only" and spec.params["topology"].norm_position == "post"
    assert (spec.model.type_vocab_size, spec.model.norm_eps, spec.model.ffn_dim) == (2, 1e-12, 96)


@pytest.mark.slow  # composes every preset
def test_presets_guess_their_model_type():
    guess = lambda name: guess_type(lc.resolve_spec(lc.compose([f"model={name}", "scale=tiny"])))  # noqa: E731
    assert [guess(n) for n in ("gpt2", "gpt2_xl", "bert_base", "bert_large")] == ["gpt2", "gpt2", "bert", "bert"]
    # Close relatives are their own types (offset positions, factorized shared layers); banded layers
    # and pre-norm encoders are none.
    assert guess("roberta_base") == "roberta" and guess("albert_base") == "albert" and guess("gpt3") is None
    assert guess_type(lc.resolve_spec(lc.compose(["model=bert_base", "scale=tiny",
                                                  "topology.norm_position=pre"]))) is None


def test_a_preset_exports_and_transformers_agrees(tmp_path):
    for preset, case in (("gpt2", "gpt2"), ("bert_base", "bert")):
        cfg = lc.compose([f"model={preset}", "scale=tiny"])
        torch.manual_seed(0)
        model = lc.build(cfg).eval()
        back = AUTO[CASES[case][1]].from_pretrained(to_hf(model, cfg, tmp_path / preset),
                                                    attn_implementation="eager").eval()
        with torch.no_grad():
            torch.testing.assert_close(run_theirs(back, case), run_ours(model, case), atol=1e-4, rtol=0)


def test_an_unrepresentable_spec_is_refused_on_export(tmp_path):
    cfg = lc.compose(["model=roberta_base", "scale=tiny"])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg), cfg, tmp_path / "out", model_type="bert")
    assert info.value.key == "position.offset"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ older and other layouts

def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_gpt2_buffers_and_tied_copy_of_older_checkpoints_are_ignored(tmp_path):
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)

    def old(t):
        for i in range(2):
            t[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            t[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        t["lm_head.weight"] = t["transformer.wte.weight"].clone()

    _edit_tensors(tmp_path, old)
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


def test_bert_position_ids_and_tied_decoder_copies_are_ignored(tmp_path):
    hf = hf_model("bert")
    hf.save_pretrained(tmp_path)

    def old(t):
        t["bert.embeddings.position_ids"] = torch.arange(64).unsqueeze(0)
        t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].clone()
        t["cls.predictions.decoder.bias"] = t["cls.predictions.bias"].clone()

    _edit_tensors(tmp_path, old)
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, TYPES).logits, run_theirs(hf, "bert"), atol=1e-4, rtol=0)


def test_bert_pretraining_checkpoint_pooler_ignored_or_kept(tmp_path):
    hf = hf_model("bert", transformers.BertForPreTraining)
    hf.save_pretrained(tmp_path / "ck")
    with torch.no_grad():
        expected = hf(IDS, token_type_ids=TYPES).prediction_logits
    cfg, model = from_hf(tmp_path / "ck")  # BertForMaskedLM's view: no pooler, no next-sentence head
    assert model.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, TYPES).logits, expected, atol=1e-4, rtol=0)

    cfg, model = from_hf(tmp_path / "ck", ["topology.pooler=true"])
    assert torch.equal(model.pooler.weight, hf.bert.pooler.dense.weight)
    assert torch.equal(model.pooler.bias, hf.bert.pooler.dense.bias)
    out = to_hf(model, cfg, tmp_path / "out")
    back, info = transformers.BertModel.from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"], info
    assert torch.equal(back.pooler.dense.weight, hf.bert.pooler.dense.weight)
    again_cfg, again = from_hf(out, ["topology.pooler=true"])
    assert torch.equal(again.pooler.weight, hf.bert.pooler.dense.weight)


# ------------------------------------------------------------------ bad input

@pytest.fixture(params=["gpt2", "bert"])
def saved(request, tmp_path):
    hf_model(request.param).save_pretrained(tmp_path / "ck")
    return request.param, tmp_path / "ck"


MISSING = {"gpt2": "transformer.h.1.mlp.c_fc.weight", "bert": "bert.encoder.layer.1.attention.self.key.bias"}
EXTRA = {"gpt2": "transformer.h.0.mystery.weight", "bert": "bert.encoder.layer.0.mystery.weight"}
RESHAPED = {"gpt2": ("transformer.ln_f.weight", "decoder.final_norm.weight"),
            "bert": ("bert.embeddings.LayerNorm.weight", "embed.norm.weight")}


def test_missing_tensor_is_named(saved):
    kind, folder = saved
    _edit_tensors(folder, lambda t: t.pop(MISSING[kind]))
    with pytest.raises(InteropError, match=MISSING[kind]):
        from_hf(folder)


def test_unexpected_tensor_is_named(saved):
    kind, folder = saved
    _edit_tensors(folder, lambda t: t.update({EXTRA[kind]: torch.zeros(3)}))
    with pytest.raises(InteropError, match=EXTRA[kind]):
        from_hf(folder)


def test_shape_mismatch_is_named(saved):
    kind, folder = saved
    theirs, ours = RESHAPED[kind]
    _edit_tensors(folder, lambda t: t.update({theirs: torch.ones(65)}))
    with pytest.raises(InteropError, match=f"{theirs}|{ours}"):
        from_hf(folder)


def test_pooler_asked_for_but_absent_is_named(tmp_path):
    hf_model("bert").save_pretrained(tmp_path)  # BertForMaskedLM: no pooler
    with pytest.raises(InteropError, match="bert.pooler.dense"):
        from_hf(tmp_path, ["topology.pooler=true"])


@pytest.mark.parametrize("kind, field, value", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", "reorder_and_upcast_attn", True),
    ("gpt2", "add_cross_attention", True),
    ("gpt2", "activation_function", "gelu_fast"),
    ("bert", "position_embedding_type", "relative_key_query"),
    ("bert", "is_decoder", True),
    ("bert", "add_cross_attention", True),
    ("bert", "hidden_act", "tanh"),
])
def test_unrepresentable_config_field_is_named(tmp_path, kind, field, value):
    hf_model(kind).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        from_hf(tmp_path)
    assert info.value.key == field


def test_fused_qkv_part_of_a_wrong_width_is_named(tmp_path):
    hf_model("bert").save_pretrained(tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update({"bert.encoder.layer.0.attention.self.key.weight": torch.ones(65, 64)}))
    with pytest.raises(InteropError, match="attention.self.key.weight|encoder.blocks.0.attn.qkv.weight"):
        from_hf(tmp_path)


# ------------------------------------------------------------------ older checkpoint layouts and bad parts

def test_fused_qkv_part_of_a_wrong_input_width_is_named(tmp_path):
    hf_model("bert").save_pretrained(tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update({"bert.encoder.layer.0.attention.self.key.weight": torch.ones(64, 65)}))
    with pytest.raises(InteropError, match="attention.self.key.weight"):
        from_hf(tmp_path)


def test_gpt2_checkpoint_without_the_transformer_prefix_loads(tmp_path):
    hf = hf_model("gpt2")
    hf.save_pretrained(tmp_path)

    def strip(t):
        for key in list(t):
            t[key.removeprefix("transformer.")] = t.pop(key)

    _edit_tensors(tmp_path, strip)
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


def test_bert_checkpoint_with_gamma_beta_layernorms_loads(tmp_path):
    hf = hf_model("bert")
    hf.save_pretrained(tmp_path)

    def legacy(t):
        for key in [k for k in t if "LayerNorm." in k]:
            old = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
            t[old] = t.pop(key)

    _edit_tensors(tmp_path, legacy)
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS, TYPES).logits, run_theirs(hf, "bert"), atol=1e-4, rtol=0)
