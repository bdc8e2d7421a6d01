"""Hugging Face interop for the BERT-like encoders beside BERT: RoBERTa, XLM-RoBERTa,
DistilBERT, ALBERT and ELECTRA's generator (their masked-LM classes). The standard checks
(hf_parity: logits eager and compiled, round trips, fill-mask), RoBERTa's positions with
padding tokens (what matches transformers and what does not), ALBERT's layer groups,
the presets written as their own types, and refusals that name the field."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import InteropError, config_overrides, from_hf, to_hf
from llmarch_compose.interop.types import MODEL_TYPES, guess_type
from hf_parity import VOCAB, Case, build_hf, config, pair, parity_tests
from test_generate_hf import MARGIN, PROMPT, least_margin, left_padded

BERT_LIKE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, vocab_size=VOCAB,
                 max_position_embeddings=64)
DISTIL = dict(dim=64, n_layers=2, n_heads=4, hidden_dim=96, vocab_size=VOCAB, max_position_embeddings=64)


CASES = {
    # RoBERTa-base's shape: one token type, eps 1e-5, pad 1 (positions from row 2).
    "roberta": Case(config(transformers.RobertaConfig, BERT_LIKE, type_vocab_size=1, layer_norm_eps=1e-5),
                    transformers.RobertaForMaskedLM),
    # pad 0 (positions from row 1), two token types, an untied decoder with its own bias.
    "roberta_untied": Case(config(transformers.RobertaConfig, BERT_LIKE, pad_token_id=0, tie_word_embeddings=False),
                           transformers.RobertaForMaskedLM),
    "xlm_roberta": Case(config(transformers.XLMRobertaConfig, BERT_LIKE, type_vocab_size=1, layer_norm_eps=1e-5),
                        transformers.XLMRobertaForMaskedLM),
    "distilbert": Case(config(transformers.DistilBertConfig, DISTIL), transformers.DistilBertForMaskedLM),
    # ReLU in FFN and head, an untied head, the sinusoidal option (an initialization in transformers 5).
    "distilbert_relu_untied": Case(config(transformers.DistilBertConfig, DISTIL, activation="relu",
                                          tie_word_embeddings=False, sinusoidal_pos_embds=True),
                                   transformers.DistilBertForMaskedLM),
    # ALBERT-base's layout: 32-wide embeddings projected to 64, one block shared by both layers.
    "albert": Case(config(transformers.AlbertConfig, BERT_LIKE, embedding_size=32), transformers.AlbertForMaskedLM),
    # One group per layer (no sharing), exact GELU, an untied decoder.
    "albert_unshared_untied": Case(config(transformers.AlbertConfig, BERT_LIKE, embedding_size=32, num_hidden_groups=2,
                                          hidden_act="gelu", tie_word_embeddings=False),
                                   transformers.AlbertForMaskedLM),
    # ELECTRA's generator: 32-wide embeddings projected to 64 and back in the head.
    "electra": Case(config(transformers.ElectraConfig, BERT_LIKE, embedding_size=32), transformers.ElectraForMaskedLM),
    # Embeddings as wide as the model (no projection), an untied head.
    "electra_square_untied": Case(config(transformers.ElectraConfig, BERT_LIKE, embedding_size=64,
                                         tie_word_embeddings=False), transformers.ElectraForMaskedLM),
}
globals().update(parity_tests(CASES))


def spec_of(cfg):
    return lc.resolve_spec(cfg)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(transformers' model, our config, our model) of a case: hf_parity's, built once."""
    return lambda name: pair(CASES, name, tmp_path_factory)


# ------------------------------------------------------------------ config -> groups and numbers

def test_config_maps_onto_groups_and_numbers(converted):
    spec = spec_of(converted("roberta")[1])
    assert spec.components == {"position": "learned", "norm": "layernorm", "activation": "gelu", "attention": "mha",
                               "ffn": "dense", "topology": "encoder_only"}
    # 64 rows, the first two before position 0: 62 positions.
    assert (spec.model.position_offset, spec.model.max_seq_len, spec.model.pad_token_id) == (2, 62, 1)
    assert (spec.model.type_vocab_size, spec.model.norm_eps) == (1, 1e-5)
    assert spec_of(converted("roberta_untied")[1]).model.position_offset == 1  # pad 0
    spec = spec_of(converted("distilbert")[1])
    assert (spec.model.type_vocab_size, spec.model.norm_eps, spec.model.n_layers) == (0, 1e-12, 2)
    assert spec_of(converted("distilbert_relu_untied")[1]).components["activation"] == "relu"
    spec = spec_of(converted("albert")[1])
    assert spec.params["topology"].share_layers and spec.model.embedding_dim == 32
    assert spec.components["activation"] == "gelu_tanh"  # gelu_new
    assert not spec_of(converted("albert_unshared_untied")[1]).params["topology"].share_layers
    assert spec_of(converted("electra")[1]).model.embedding_dim == 32
    assert spec_of(converted("electra_square_untied")[1]).model.embedding_dim is None


def test_shared_albert_has_one_block_for_every_layer(converted):
    _, _, ours = converted("albert")
    assert len(ours.encoder.blocks) == 1 and ours.encoder.repeats == 2
    _, _, ours = converted("albert_unshared_untied")
    assert len(ours.encoder.blocks) == 2 and ours.encoder.repeats == 1


def test_left_out_fields_read_as_transformers_defaults():
    overrides = config_overrides({"model_type": "xlm-roberta"}, MODEL_TYPES)[1]
    # XLMRobertaConfig(): 512 rows, pad 1 -> 510 positions from row 2, eps 1e-12, 30522 tokens.
    for expected in ("model.max_seq_len=510", "model.position_offset=2", "model.norm_eps=1e-12",
                     "model.vocab_size=30522", "model.pad_token_id=1"):
        assert expected in overrides, overrides
    overrides = config_overrides({"model_type": "albert"}, MODEL_TYPES)[1]
    for expected in ("model.d_model=4096", "model.embedding_dim=128", "topology.share_layers=true",
                     "activation=gelu_tanh"):
        assert expected in overrides, overrides
    assert "model.d_model=768" in config_overrides({"model_type": "distilbert"}, MODEL_TYPES)[1]


def test_published_configs_of_older_transformers_are_read():
    """Fields the published config.json files carry that transformers 5's classes lack."""
    albert_base_v2 = {"model_type": "albert", "down_scale_factor": 1, "gap_size": 0, "net_structure_type": 0,
                      "num_memory_blocks": 0, "embedding_size": 128, "hidden_size": 768, "num_attention_heads": 12,
                      "intermediate_size": 3072, "hidden_act": "gelu_new", "vocab_size": 30000}
    config_overrides(albert_base_v2, MODEL_TYPES)
    xlmr = {"model_type": "xlm-roberta", "output_past": True, "position_embedding_type": "absolute",
            "max_position_embeddings": 514, "vocab_size": 250002, "layer_norm_eps": 1e-5, "type_vocab_size": 1}
    assert "model.max_seq_len=512" in config_overrides(xlmr, MODEL_TYPES)[1]
    distilbert = {"model_type": "distilbert", "output_past": True, "tie_weights_": True, "sinusoidal_pos_embds": False}
    config_overrides(distilbert, MODEL_TYPES)
    config_overrides({"model_type": "bert", "position_embedding_type": "absolute"}, MODEL_TYPES)


@pytest.mark.parametrize("model_type, field, value", [
    ("roberta", "hidden_act", "gelu_new"),  # the head's GELU is fixed: ours shares one activation
    ("roberta", "pad_token_id", None),  # positions count from pad_token_id + 1
    ("roberta", "max_position_embeddings", 2),  # no row left after the offset
    ("xlm-roberta", "position_embedding_type", "relative_key_query"),
    ("xlm-roberta", "is_decoder", True),
    ("electra", "hidden_act", "relu"),  # the generator head's GELU is fixed
    ("electra", "position_embedding_type", "relative_key"),
    ("albert", "inner_group_num", 2),
    ("albert", "num_hidden_groups", 3),  # groups of several layers (12 layers)
    ("albert", "embedding_size", 4096),  # ALBERT projects even equal widths; ours does not
    ("albert", "net_structure_type", 1),
    ("distilbert", "tie_weights_", False),
    ("distilbert", "activation", "tanh"),
    ("distilbert", "type_vocab_size", 2),  # not a DistilBERT field: BERT's
])
def test_unrepresentable_config_field_is_named(model_type, field, value):
    with pytest.raises(ConfigError) as info:
        config_overrides({"model_type": model_type, field: value}, MODEL_TYPES)
    assert info.value.key == field


# ------------------------------------------------------------------ RoBERTa's positions and padding

def test_roberta_positions_with_a_padding_token_inside_a_sequence(converted):
    """transformers gives a pad_token_id token the padding row and does not count it; ours
    counts every token from row pad_token_id + 1: the logits differ, and ours are
    transformers' with position_ids = arange + pad_token_id + 1."""
    hf, cfg, ours = converted("roberta")
    ids = PROMPT.clone()
    ids[0, 5] = hf.config.pad_token_id
    positions = torch.arange(ids.shape[1]) + hf.config.pad_token_id + 1
    with torch.no_grad():
        mine, theirs = ours(ids).logits, hf(ids).logits
        counted = hf(ids, position_ids=positions.expand_as(ids)).logits
    torch.testing.assert_close(mine, counted, atol=1e-4, rtol=0)
    assert (mine[0] - theirs[0]).abs().max() > 1e-2  # the row holding the padding token
    torch.testing.assert_close(mine[1], theirs[1], atol=1e-4, rtol=0)  # the row without


def test_roberta_left_padded_batch_with_its_mask_fills_as_transformers(converted):
    """Left padding with pad_token_id and the mask: positions count from each row's first
    real token in both, and the padding is masked."""
    hf, _, ours = converted("roberta")
    mask_id = 2
    rows = [PROMPT[0].clone(), PROMPT[1, :8].clone()]
    rows[0][[2, 8]] = mask_id
    rows[1][[0, 3]] = mask_id
    ids, attention = left_padded(rows, fill=hf.config.pad_token_id)
    filled = lc.fill_mask(ours, ids, mask_id, attention_mask=attention)
    with torch.no_grad():
        logits = hf(ids, attention_mask=attention).logits
    where = ids == mask_id
    assert least_margin(logits[where]) > MARGIN
    assert torch.equal(filled[where], logits.argmax(-1)[where])
    assert torch.equal(filled[~where], ids[~where])


# ------------------------------------------------------------------ checkpoints of other classes

@pytest.mark.slow
def test_albert_pretraining_checkpoint_pooler_ignored_or_kept(tmp_path):
    hf = build_hf(Case(CASES["albert"].config, transformers.AlbertForPreTraining))
    hf.save_pretrained(tmp_path / "ck")
    ids = PROMPT
    with torch.no_grad():
        expected = hf(ids).prediction_logits
    _, model = from_hf(tmp_path / "ck")  # the masked-LM view: no pooler, no sentence-order head
    assert model.pooler is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=0)
    cfg, model = from_hf(tmp_path / "ck", ["topology.pooler=true"])
    assert torch.equal(model.pooler.weight, hf.albert.pooler.weight)
    back, info = transformers.AlbertModel.from_pretrained(to_hf(model, cfg, tmp_path / "out"),
                                                          output_loading_info=True)
    assert not info["missing_keys"], info
    assert torch.equal(back.pooler.weight, hf.albert.pooler.weight)


@pytest.mark.slow
def test_electra_discriminator_checkpoint_is_refused_naming_the_generator_head(tmp_path):
    build_hf(Case(CASES["electra"].config, transformers.ElectraForPreTraining)).save_pretrained(tmp_path)
    with pytest.raises(InteropError, match="generator_predictions"):
        from_hf(tmp_path)


@pytest.mark.slow
def test_older_checkpoints_with_tied_copies_and_buffers_load(converted, tmp_path):
    hf, _, _ = converted("roberta")
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["roberta.embeddings.position_ids"] = torch.arange(64)[None]
    tensors["lm_head.decoder.weight"] = tensors["roberta.embeddings.word_embeddings.weight"].clone()
    tensors["lm_head.decoder.bias"] = tensors["lm_head.bias"].clone()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(PROMPT).logits, hf(PROMPT).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------ writing

def test_untied_bias_is_written_under_both_names(converted, tmp_path):
    """transformers 5 keeps lm_head.bias beside the untied decoder's bias (which its forward adds)."""
    _, cfg, ours = converted("roberta_untied")
    tensors = load_file(to_hf(ours, cfg, tmp_path / "out") / "model.safetensors")
    assert torch.equal(tensors["lm_head.bias"], tensors["lm_head.decoder.bias"])
    assert torch.equal(tensors["lm_head.decoder.bias"], ours.head.bias)


def tiny(*overrides):
    return lc.compose([*overrides, "scale=tiny"])


@pytest.mark.slow
@pytest.mark.parametrize("overrides, model_type, key", [
    (["model=roberta_base", "model.pad_token_id=null"], "roberta", "position.offset"),
    (["model=roberta_base", "model.pad_token_id=0"], "xlm-roberta", "position.offset"),
    (["model=roberta_base", "activation=gelu_tanh"], "roberta", "activation.approximate"),
    (["model=bert_base", "activation=relu"], "electra", "activation"),
    (["model=distilbert_base", "model.type_vocab_size=2"], "distilbert", "model.type_vocab_size"),
    (["model=distilbert_base", "model.norm_eps=1e-5"], "distilbert", "norm.eps"),
    (["model=distilbert_base", "topology.pooler=true"], "distilbert", "topology.pooler"),
    (["model=albert_base", "model.embedding_dim=null"], "albert", "model.embedding_dim"),
    (["model=albert_base", "topology.share_layers=false"], "bert", "model.embedding_dim"),
    (["model=albert_base", "activation=gelu"], "electra", "topology.share_layers"),
])
def test_what_a_type_cannot_express_is_refused_by_field(overrides, model_type, key, tmp_path):
    cfg = tiny(*overrides)
    with pytest.raises(ConfigError) as info:
        to_hf(lc.build(cfg), cfg, tmp_path / "out", model_type=model_type)
    assert info.value.key == key
    assert not (tmp_path / "out").exists()


AUTO = {"roberta": transformers.RobertaForMaskedLM, "xlm-roberta": transformers.XLMRobertaForMaskedLM,
        "distilbert": transformers.DistilBertForMaskedLM, "albert": transformers.AlbertForMaskedLM}


@pytest.mark.slow
@pytest.mark.parametrize("preset, model_type", [("roberta_base", "roberta"), ("xlm_roberta_base", "xlm-roberta"),
                                                ("distilbert_base", "distilbert"), ("albert_base", "albert")])
def test_presets_are_written_as_their_own_type_and_transformers_agrees(preset, model_type, tmp_path):
    cfg = tiny(f"model={preset}")
    assert guess_type(lc.resolve_spec(cfg)) == ("roberta" if model_type == "xlm-roberta" else model_type)
    torch.manual_seed(0)
    model = lc.build(cfg).eval()
    out = to_hf(model, cfg, tmp_path / "out", model_type=model_type)
    assert json.loads((out / "config.json").read_text())["model_type"] == model_type
    back, info = AUTO[model_type].from_pretrained(out, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = PROMPT % lc.resolve_spec(cfg).model.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
