"""Each mapped model type's DEFAULTS table (what a config.json that leaves a field out
means) equals the transformers config class's defaults, for every field it lists."""

from __future__ import annotations

import inspect

import pytest

transformers = pytest.importorskip("transformers")

from llmarch_compose.interop.types import MODEL_TYPES  # noqa: E402

# Fields a config class derives from others when left out: their default is the argument's.
DERIVED = {"head_dim", "num_key_value_heads", "num_decoder_layers"}


def transformers_default(config_cls, field):
    config = config_cls()
    if field in DERIVED:
        parameter = inspect.signature(config_cls.__init__).parameters.get(field)
        return parameter.default if parameter is not None else getattr(config, field, None)
    if field == "rope_theta":  # transformers 5 keeps it in rope_parameters
        params = getattr(config, "rope_parameters", None) or {}
        return params.get("rope_theta", getattr(config, "rope_theta", None))
    return getattr(config, field)


@pytest.mark.parametrize("name", sorted(MODEL_TYPES))
def test_defaults_are_the_config_class_defaults(name):
    kind = MODEL_TYPES[name]
    assert kind.defaults, f"{name} declares no DEFAULTS"
    config_cls = transformers.CONFIG_MAPPING[name]
    theirs = {field: transformers_default(config_cls, field) for field in kind.defaults}
    assert dict(kind.defaults) == theirs


@pytest.mark.parametrize("name", sorted(MODEL_TYPES))
def test_a_left_out_field_reads_as_transformers_reads_it(name, tmp_path):
    """An empty-but-for-the-sizes config.json: ours and transformers' agree on what it says."""
    from llmarch_compose.interop.hf import config_overrides

    kind = MODEL_TYPES[name]
    _, overrides = config_overrides({"model_type": name}, MODEL_TYPES)
    assert any(o.startswith("model.d_model=") for o in overrides)
    eps = {"llama": 1e-6, "mistral": 1e-6, "mixtral": 1e-5, "qwen2": 1e-6, "glm": 1.5625e-07,
           "qwen2_moe": 1e-6, "qwen3_moe": 1e-6, "deepseek_v3": 1e-6, "gpt2": 1e-5, "bert": 1e-12, "t5": 1e-6}
    if name in eps:
        assert f"model.norm_eps={eps[name]!r}" in overrides, overrides
    if name == "mistral":
        assert "model.window=4096" in overrides
