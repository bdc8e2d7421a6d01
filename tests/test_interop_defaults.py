"""Each mapped model type's DEFAULTS table lists every field of the transformers config class
with its default (what a config.json that leaves a field out means); a config.json field
outside it, or one the mapping never reads that is not at its default, is refused by name."""

from __future__ import annotations

import dataclasses

import pytest

transformers = pytest.importorskip("transformers")

from llmarch_compose.errors import ConfigError  # noqa: E402
from llmarch_compose.interop.fields import GENERIC, GENERIC_DEFAULTS, inert  # noqa: E402
from llmarch_compose.interop.hf import config_overrides  # noqa: E402
from llmarch_compose.interop.types import MODEL_TYPES  # noqa: E402

# Fields a config class derives from others when left out: a config.json without them means
# the field's own default (None), not the value derived for the class's default sizes.
DERIVED = {"head_dim", "num_key_value_heads", "num_decoder_layers", "rope_parameters", "layer_types",
           "num_kv_heads", "ffn_hidden_size",  # Falcon: the attention heads, 4 x hidden_size
           "sliding_window", "word_embed_proj_dim", "no_rope_layers", "attn_config", "decoder_vocab_size"}
BASE = {f.name for f in dataclasses.fields(transformers.PreTrainedConfig)}


def field_default(config_cls, name):
    f = next((f for f in dataclasses.fields(config_cls) if f.name == name), None)
    if f is None:  # an older spelling the class still reads (Qwen-2's head_dim)
        return getattr(config_cls(), name, None)
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def transformers_default(config_cls, field):
    if field in DERIVED:
        return field_default(config_cls, field)
    config = config_cls()
    if field == "rope_theta":  # transformers 5 keeps it in rope_parameters
        params = getattr(config, "rope_parameters", None) or {}
        return params.get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, field)


@pytest.mark.parametrize("name", sorted(MODEL_TYPES))
def test_defaults_are_the_config_class_defaults(name):
    kind = MODEL_TYPES[name]
    config_cls = transformers.CONFIG_MAPPING[name]
    theirs = {field: transformers_default(config_cls, field) for field in kind.defaults}
    assert dict(kind.defaults) == theirs


@pytest.mark.parametrize("name", sorted(MODEL_TYPES))
def test_defaults_list_every_field_that_can_change_the_model(name):
    """Every field of the config class is in DEFAULTS, generic, or inert (initialization, dropout)."""
    config_cls = transformers.CONFIG_MAPPING[name]
    own = [f.name for f in dataclasses.fields(config_cls) if f.name not in BASE]
    missing = [f for f in own if f not in MODEL_TYPES[name].defaults and f not in GENERIC
               and f not in GENERIC_DEFAULTS and not inert(f)]
    assert not missing, f"{name}: DEFAULTS lacks {missing}"


def test_every_generic_field_of_a_transformers_config_is_known():
    generic = set(transformers.PreTrainedConfig().to_dict())
    assert generic <= GENERIC | set(GENERIC_DEFAULTS), generic - GENERIC - set(GENERIC_DEFAULTS)


@pytest.mark.parametrize("name", sorted(MODEL_TYPES))
def test_a_left_out_field_reads_as_transformers_reads_it(name, tmp_path):
    """An empty-but-for-the-sizes config.json: ours and transformers' agree on what it says."""
    _, overrides = config_overrides({"model_type": name}, MODEL_TYPES)
    assert any(o.startswith("model.d_model=") for o in overrides)
    eps = {"llama": 1e-6, "mistral": 1e-6, "mixtral": 1e-5, "qwen2": 1e-6, "glm": 1.5625e-07,
           "qwen2_moe": 1e-6, "qwen3": 1e-6, "qwen3_moe": 1e-6, "deepseek_v3": 1e-6, "gpt2": 1e-5, "bert": 1e-12,
           "t5": 1e-6, "starcoder2": 1e-5, "gpt_neox": 1e-5, "gpt_bigcode": 1e-5, "opt": 1e-5}
    if name in eps:
        assert f"model.norm_eps={eps[name]!r}" in overrides, overrides
    if name == "mistral":
        assert "model.window=4096" in overrides


@pytest.mark.parametrize("field, value, said", [
    ("hidden_activation", "gelu_pytorch_tanh", "not a field of llama's config"),  # a Gemma relabelled llama
    ("no_rope_layers", [1, 1, 1, 0], "not a field of llama's config"),  # a SmolLM3 relabelled llama
    ("auto_map", {"AutoModel": "modeling_x.X"}, "remote code"),
    ("quantization_config", {"quant_method": "fp8"}, "quantized"),
    ("is_decoder", True, "not at transformers' default"),
    ("pruned_heads", {"0": [1]}, "not at transformers' default"),
])
def test_fields_that_would_change_the_model_unread_are_refused(field, value, said):
    with pytest.raises(ConfigError, match=said) as err:
        config_overrides({"model_type": "llama", field: value}, MODEL_TYPES)
    assert err.value.key == field


def test_a_field_of_another_mapped_type_names_that_type():
    with pytest.raises(ConfigError, match="the gpt_oss, mixtral, qwen3_moe configs have it") as err:
        config_overrides({"model_type": "llama", "num_local_experts": 8}, MODEL_TYPES)
    assert err.value.key == "num_local_experts"


def test_generic_and_inert_fields_are_accepted():
    config_overrides({"model_type": "llama", "torch_dtype": "bfloat16", "initializer_range": 0.01,
                      "attention_dropout": 0.1, "num_beams": 4, "transformers_version": "4.40.0",
                      "use_cache": False, "id2label": {"0": "a"}}, MODEL_TYPES)


def test_fields_at_their_default_need_no_reading():
    """Qwen-2's window fields are read and moot when no layer slides; at any value they pass."""
    config_overrides({"model_type": "qwen2", "sliding_window": 131072, "max_window_layers": 28,
                      "use_sliding_window": False}, MODEL_TYPES)
    with pytest.raises(ConfigError, match="use_sliding_window"):
        config_overrides({"model_type": "qwen2", "use_sliding_window": True}, MODEL_TYPES)
