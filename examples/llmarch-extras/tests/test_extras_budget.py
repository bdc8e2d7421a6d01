"""The context_budget task against the architecture card's figures."""

import json

import pytest

from llmarch_compose import ConfigError, compose, resolve_spec
from llmarch_compose.model.card import architecture_card
from llmarch_compose.plugin import registry


def run(capsys, *overrides):
    cfg = compose(["task=context_budget", *overrides])
    result = registry.get("task", "context_budget").target(cfg)
    return result, capsys.readouterr().out


def test_the_budget_is_the_memory_left_over_the_cache_per_token(capsys):
    result, out = run(capsys, "model=llama2_7b", "task.memory_gib=24", "task.format=json")
    card = architecture_card(resolve_spec(compose(["model=llama2_7b"])))
    left = 24 * 2**30 - card["inference_weight_bytes"]
    assert result["max_context_tokens"] == left // card["kv_cache_bytes_per_token"]
    assert json.loads(out) == result


def test_mqa_fits_more_context_than_mha(capsys):
    mha, _ = run(capsys, "model=llama2_7b", "attention=mha")
    mqa, _ = run(capsys, "model=llama2_7b", "attention=mqa")
    assert mqa["max_context_tokens"] > 30 * mha["max_context_tokens"]


def test_a_budget_must_be_positive(capsys):
    with pytest.raises(ConfigError) as info:
        run(capsys, "task.memory_gib=0")
    assert info.value.key == "task.memory_gib"
