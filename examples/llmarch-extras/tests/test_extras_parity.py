"""The parity data source: targets against a loop, seeds, splits, and its errors."""

import pytest
import torch

from llmarch_compose import ConfigError, compose
from llmarch_compose.plugin.objectives import CAUSAL_LM, MASKED_LM
from llmarch_compose.train.data import data_config, make_source
from llmarch_extras.parity import EVEN, ODD, Parity


def source(*overrides):
    return make_source(data_config(compose(["data=parity", *overrides]).data), CAUSAL_LM, "decoder_only")


def test_targets_are_the_running_parity():
    src = source("data.length=12")
    assert isinstance(src, Parity) and src.natural_seq_len == 12
    x, y = src.batch("train", 5, 12, torch.Generator().manual_seed(0))
    for row in range(5):
        running = 0
        for t in range(12):
            running ^= int(x[row, t])
            assert int(y[row, t]) == (ODD if running else EVEN)


def test_seeded_and_splits_differ():
    src = source()
    a = src.batch("train", 8, 32, torch.Generator().manual_seed(3))
    b = src.batch("train", 8, 32, torch.Generator().manual_seed(3))
    v = src.batch("val", 8, 32, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], v[0])


def test_errors_name_the_key():
    with pytest.raises(ConfigError) as info:
        source("data.length=0")
    assert info.value.key == "data.length"
    with pytest.raises(ConfigError) as info:
        source().check_seq_len(16)
    assert info.value.key == "task.seq_len"
    with pytest.raises(ConfigError) as info:
        make_source(data_config(compose(["data=parity"]).data), MASKED_LM, "encoder_only")
    assert info.value.key == "data"
