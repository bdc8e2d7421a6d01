"""Hugging Face interop for the encoder-decoders T5 (v1.0 and v1.1 / Flan) and BART:
decoder logits equal to transformers' on the same weights (eager and compiled), round
trips that transformers loads cleanly, the presets written out, and errors that name
the tensor or field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import InteropError, from_hf, to_hf
from llmarch_compose.interop.types import bart, guess_type, t5

T5 = dict(d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4, vocab_size=128)
BART = dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
            encoder_ffn_dim=96, decoder_ffn_dim=96, vocab_size=128, max_position_embeddings=64)
CASES = {
    # v1.0: ReLU, the head tied and scaled by d_model**-0.5.
    "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration, {}, False),
    # v1.1 / Flan-T5: gated tanh-GELU, a head of its own; d_kv * heads != d_model, and sources
    # longer than max_distance so the far buckets are used.
    "t5_v1_1": (transformers.T5Config, transformers.T5ForConditionalGeneration,
                dict(d_kv=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                     relative_attention_num_buckets=16, relative_attention_max_distance=20), True),
    "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration, {}, False),
    "bart_relu": (transformers.BartConfig, transformers.BartForConditionalGeneration,
                  dict(activation_function="relu", max_position_embeddings=40), False),
}
SRC = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
TGT = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that a wrong mapping shows: norms around 1, relative position
    tables and BART's final_logits_bias well away from 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * noise)
            elif "relative_attention_bias" in name or "position" in name and "table" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)
        for name, b in model.named_buffers():
            if name.endswith("final_logits_bias") or name == "head.bias":
                b.copy_(0.5 * torch.randn(b.shape, generator=generator))
    return model.eval()


def hf_model(case: str):
    config_cls, model_cls, extra, own_head = CASES[case]
    config = config_cls(**{**(T5 if config_cls is transformers.T5Config else BART), **extra})
    config._attn_implementation = "eager"
    model = model_cls(config)
    if own_head:  # transformers 5 ties every T5 head; a Flan-T5 checkpoint has a head of its own
        model.lm_head.weight = nn.Parameter(torch.empty(config.vocab_size, config.d_model))
    return randomize(model)


def logits(model, src=SRC, tgt=TGT):
    with torch.no_grad():
        if isinstance(model, transformers.PreTrainedModel):
            return model(input_ids=src, decoder_input_ids=tgt).logits
        return model(src, tgt).logits


@pytest.fixture(scope="module", params=list(CASES))
def converted(request):
    hf = hf_model(request.param)
    cfg, model = from_hf(hf)
    return request.param, hf, cfg, model.eval()


def test_logits_match_transformers(converted):
    _, hf, _, model = converted
    ours = logits(model)
    assert ours.shape == (2, TGT.shape[1], 128)
    torch.testing.assert_close(ours, logits(hf), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_logits_match_transformers(converted):
    torch._dynamo.reset()
    _, hf, _, model = converted
    torch.testing.assert_close(logits(torch.compile(model, fullgraph=True)), logits(hf), atol=1e-4, rtol=0)


def test_round_trip_loads_cleanly_in_transformers(converted, tmp_path):
    case, hf, cfg, model = converted
    out = to_hf(model, cfg, tmp_path / "out")  # the model type guessed from the spec
    back, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert type(back) is type(hf)
    tied = lc.resolve_spec(cfg).model.tie_embeddings
    assert (back.lm_head.weight is back.get_input_embeddings().weight) == tied
    torch.testing.assert_close(logits(back.eval()), logits(hf), atol=1e-4, rtol=0)
    _, again = from_hf(out)  # and back to ours
    torch.testing.assert_close(logits(again.eval()), logits(hf), atol=1e-4, rtol=0)


def test_config_maps_onto_groups_and_numbers():
    cfg, _ = from_hf(hf_model("t5"))
    spec = lc.resolve_spec(cfg)
    assert spec.components["topology"] == "t5" and spec.components["activation"] == "relu"
    assert spec.model.tie_embeddings and spec.params["topology"].scale_tied_head
    assert spec.params["attention"].scale == 1.0 and spec.model.head_dim == 16
    cfg, _ = from_hf(hf_model("t5_v1_1"))
    spec = lc.resolve_spec(cfg)
    assert spec.components["activation"] == "geglu_tanh" and not spec.model.tie_embeddings
    assert (spec.params["position"].num_buckets, spec.params["position"].max_distance) == (16, 20)
    assert spec.model.head_dim == 8 and spec.model.ffn_dim == 96
    cfg, model = from_hf(hf_model("bart"))
    spec = lc.resolve_spec(cfg)
    assert spec.components["topology"] == "bart" and spec.params["position"].offset == 2
    assert model.position.table.weight.shape == (64 + 2, 64) and spec.params["attention"].scale is None
    assert spec.components["activation"] == "gelu" and spec.model.tie_embeddings


def test_t5_config_written_before_transformers_5(tmp_path):
    """Hub Flan-T5 configs say tie_word_embeddings: false and nothing of scaling."""
    hf = hf_model("t5_v1_1")
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs")
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    _, model = from_hf(tmp_path)
    torch.testing.assert_close(logits(model.eval()), logits(hf), atol=1e-4, rtol=0)


def test_t5_v1_1_built_by_transformers_5_is_tied_and_unscaled(tmp_path):
    """T5Config(tie_word_embeddings=False) in transformers 5 gives a tied head that is not
    scaled and stores no lm_head: named as missing, loaded with model.tie_embeddings=true."""
    config = transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    config._attn_implementation = "eager"
    hf = randomize(transformers.T5ForConditionalGeneration(config))
    assert hf.lm_head.weight is hf.shared.weight and not hf.config.scale_decoder_outputs
    with pytest.raises(InteropError, match="lm_head.weight"):
        from_hf(hf)
    cfg, model = from_hf(hf, ["model.tie_embeddings=true"])
    assert not lc.resolve_spec(cfg).params["topology"].scale_tied_head
    torch.testing.assert_close(logits(model.eval()), logits(hf), atol=1e-4, rtol=0)
    assert t5.guess(lc.resolve_spec(cfg)) is None  # it reads back as untied: never a guess
    out = to_hf(model, cfg, tmp_path / "out", model_type="t5")
    back = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, attn_implementation="eager")
    torch.testing.assert_close(logits(back.eval()), logits(hf), atol=1e-4, rtol=0)


def test_t5_head_of_its_own_but_scaled_is_refused():
    """A scaled head is a tied one (v1.0): a differing lm_head.weight is named, not dropped."""
    hf = hf_model("t5")
    hf.lm_head.weight = nn.Parameter(torch.randn(128, 64))
    with pytest.raises(InteropError, match="lm_head.weight"):
        from_hf(hf)


@pytest.mark.parametrize("preset", ["t5_small", "flan_t5_base", "bart_base"])
def test_presets_write_checkpoints_transformers_runs(preset, tmp_path):
    cfg = lc.compose([f"model={preset}", "scale=tiny"])
    model = randomize(lc.build(cfg))
    spec = lc.resolve_spec(cfg)
    name = "bart" if preset.startswith("bart") else "t5"
    assert guess_type(spec) == name
    out = to_hf(model, cfg, tmp_path / "out")
    back, info = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True,
                                                                     attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert back.config.model_type == name
    src, tgt = SRC % spec.model.vocab_size, TGT % spec.model.vocab_size
    torch.testing.assert_close(logits(back.eval(), src, tgt), logits(model, src, tgt), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_guesses_are_conservative():
    specs = {p: lc.resolve_spec(lc.compose([f"model={p}", "scale=tiny"]))
             for p in ("t5_small", "t5_base", "flan_t5_base", "bart_base", "tiny", "gpt2", "bert_base")}
    assert {p: t5.guess(s) for p, s in specs.items()} == {
        "t5_small": "t5", "t5_base": "t5", "flan_t5_base": "t5", "bart_base": None, "tiny": None, "gpt2": None,
        "bert_base": None}
    assert [p for p, s in specs.items() if bart.guess(s)] == ["bart_base"]
    for overrides in (["attention=mqa"], ["model.attention_scale=null"], ["model.mlp_bias=true"],
                      ["norm=layernorm"], ["topology.norm_position=post"], ["position=rope"]):
        assert t5.guess(lc.resolve_spec(lc.compose(["model=t5_small", "scale=tiny", *overrides]))) is None, overrides
    for overrides in (["model.position_offset=0"], ["topology.embedding_norm=false"], ["norm.eps=1e-6"],
                      ["activation=geglu"], ["topology.head_bias=none"], ["model.qkv_bias=false"]):
        assert bart.guess(lc.resolve_spec(lc.compose(["model=bart_base", "scale=tiny", *overrides]))) is None, \
            overrides


@pytest.mark.parametrize("model_type, overrides, key", [
    ("bart", ["model=t5_small"], "position"),
    ("t5", ["model=bart_base"], "position"),
    ("t5", ["model=t5_small", "model.mlp_bias=true"], "ffn.bias"),
    ("t5", ["model=flan_t5_base", "activation=geglu"], "activation.approximate"),
    ("bart", ["model=bart_base", "norm.eps=1e-6"], "norm.eps"),
    ("bart", ["model=bart_base", "model.tie_embeddings=false"], "model.tie_embeddings"),
])
def test_writing_what_the_type_cannot_hold_names_the_key(model_type, overrides, key, tmp_path):
    cfg = lc.compose([*overrides, "scale=tiny"])
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg), cfg, tmp_path / "out", model_type=model_type)
    assert info.value.key == key
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ bad input

@pytest.fixture(params=["t5", "bart"])
def saved(request, tmp_path):
    hf_model(request.param).save_pretrained(tmp_path / "ck")
    return request.param, tmp_path / "ck"


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    config.update(fields)
    (folder / "config.json").write_text(json.dumps(config))


MISSING = {"t5": "decoder.block.1.layer.1.EncDecAttention.k.weight",
           "bart": "model.decoder.layers.1.encoder_attn.v_proj.bias"}


def test_missing_tensor_is_named(saved):
    case, folder = saved
    _edit_tensors(folder, lambda t: t.pop(MISSING[case]))
    with pytest.raises(InteropError, match=MISSING[case]):
        from_hf(folder)


def test_missing_final_logits_bias_is_named(tmp_path):
    hf_model("bart").save_pretrained(tmp_path)
    _edit_tensors(tmp_path, lambda t: t.pop("final_logits_bias"))
    with pytest.raises(InteropError, match="final_logits_bias"):
        from_hf(tmp_path)


def test_unexpected_tensor_is_named(saved):
    case, folder = saved
    _edit_tensors(folder, lambda t: t.update({"encoder.block.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(InteropError, match="mystery"):
        from_hf(folder)


@pytest.mark.parametrize("tensor, shape, named", [
    ("encoder.final_layer_norm.weight", (65,), "encoder.final_norm.weight"),
    ("decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", (16, 4), "position.table.weight"),
    ("model.encoder.layernorm_embedding.weight", (65,), "encoder_embed.norm.weight"),
    ("model.decoder.embed_positions.weight", (64, 64), "position.table.weight"),
    ("final_logits_bias", (1, 129), "head.bias"),
    ("final_logits_bias", (2, 64), "head.bias"),  # as many numbers as the vocabulary, not one row
])
def test_shape_mismatch_is_named(tensor, shape, named, tmp_path):
    hf_model("bart" if tensor.startswith(("model.", "final")) else "t5").save_pretrained(tmp_path)
    _edit_tensors(tmp_path, lambda t: t.update({tensor: torch.ones(shape)}))
    with pytest.raises(InteropError, match=named):
        from_hf(tmp_path)


@pytest.mark.parametrize("case, fields, key", [
    ("t5", {"num_decoder_layers": 3}, "num_decoder_layers"),
    ("t5", {"feed_forward_proj": "gated-softplus"}, "feed_forward_proj"),
    ("t5", {"feed_forward_proj": "relu-gated"}, "feed_forward_proj"),
    ("t5", {"tie_encoder_decoder": True}, "tie_encoder_decoder"),
    ("bart", {"scale_embedding": True}, "scale_embedding"),
    ("bart", {"normalize_before": True}, "normalize_before"),
    ("bart", {"add_final_layer_norm": True}, "add_final_layer_norm"),
    ("bart", {"decoder_layers": 3}, "decoder_layers"),
    ("bart", {"decoder_ffn_dim": 128}, "decoder_ffn_dim"),
    ("bart", {"decoder_attention_heads": 8}, "decoder_attention_heads"),
    ("bart", {"activation_function": "softplus"}, "activation_function"),
    # transformers 5 unties encoder.embed_tokens and decoder.embed_tokens too: two tables.
    ("bart", {"tie_word_embeddings": False}, "tie_word_embeddings"),
])
def test_unrepresentable_config_field_is_named(case, fields, key, tmp_path):
    hf_model(case).save_pretrained(tmp_path)
    _edit_config(tmp_path, **fields)
    with pytest.raises(ConfigError) as info:
        from_hf(tmp_path)
    assert info.value.key == key
