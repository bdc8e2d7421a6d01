"""`to_dataclass` builds a typed node directly where every value already has its field's
type, and leaves everything else to OmegaConf. The direct path must give exactly what
OmegaConf gives, and must be the path the common nodes take (else the speed is gone)."""

from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import numpy as np
import pytest
from omegaconf import OmegaConf

import llmarch_compose as lc
from llmarch_compose.config.scale import ScaleConfig
from llmarch_compose.config.schema import ModelConfig
from llmarch_compose.config.structured import _construct_directly, to_dataclass
from llmarch_compose.errors import ConfigError, UnknownKeyError
from llmarch_compose.plugin import registry as plugins

# One preset per family of plugins: every position, norm, activation, attention, FFN and topology
# these choose is a node the direct path must build as OmegaConf does.
PRESETS = ["llama3_8b", "t5_base", "mixtral_8x7b", "deepseek_v3", "gemma2_9b", "bert_base", "chatglm3_6b",
           "gpt2", "gpt_oss_20b", "bart_base"]


def through_omegaconf(schema, node):
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_node_of_a_preset_is_built_directly_and_equals_omegaconfs(preset):
    cfg = lc.compose([f"model={preset}"])
    nodes = [(ModelConfig, "model")] + [(plugins.get(g, cfg[g].plugin).node, g) for g in plugins.GROUPS]
    nodes.append((ScaleConfig, "scale"))
    for schema, key in nodes:
        plain = OmegaConf.to_container(cfg[key], resolve=True)
        direct = _construct_directly(schema, plain)
        assert direct is not None, f"{key}: left to OmegaConf"
        expected = through_omegaconf(schema, plain)
        assert direct == expected, key
        assert [type(getattr(direct, f.name)) for f in dataclasses.fields(schema)] == \
            [type(getattr(expected, f.name)) for f in dataclasses.fields(schema)], key


@dataclasses.dataclass
class Sample:
    width: int = 4
    rate: float = 0.5
    name: str = "x"
    flag: bool = False
    cap: Optional[float] = None
    extra: Any = None
    items: List[Any] = dataclasses.field(default_factory=list)


def test_an_int_for_a_float_is_widened_as_omegaconf_widens_it():
    direct = _construct_directly(Sample, {"rate": 2, "cap": 3})
    assert direct == through_omegaconf(Sample, {"rate": 2, "cap": 3})
    assert type(direct.rate) is float and type(direct.cap) is float


@pytest.mark.parametrize("node", [
    {"width": True},           # a bool is no int to OmegaConf
    {"width": "4"},            # a string OmegaConf converts
    {"flag": 1},               # an int OmegaConf may read as a bool
    {"name": 3},               # a number OmegaConf turns into text
    {"name": "${width}"},      # an interpolation
    {"name": "???"},           # OmegaConf's missing value
    {"width": None},           # None where the field cannot hold it
    {"rate": 10 ** 400},       # an int no float holds
    {"rate": np.float64(0.5)}, # a NumPy scalar, which OmegaConf turns into a float
    {"extra": (1, 2)},         # a tuple OmegaConf turns into a list
    {"extra": {1: "a"}},       # a key that is not text
    {"unknown": 1},            # a key the schema does not have
])
def test_what_needs_omegaconf_is_left_to_it(node):
    assert _construct_directly(Sample, node) is None


def test_errors_still_name_the_key():
    with pytest.raises(UnknownKeyError) as unknown:
        to_dataclass(Sample, {"widht": 4}, "group")
    assert unknown.value.key == "group.widht"
    with pytest.raises(ConfigError) as wrong:
        to_dataclass(Sample, {"width": "wide"}, "group")
    assert wrong.value.key == "group.width"


def test_plain_values_are_copied_not_shared():
    extra = {"a": [1, 2]}
    direct = _construct_directly(Sample, {"extra": extra})
    extra["a"].append(3)
    assert direct.extra == {"a": [1, 2]}
