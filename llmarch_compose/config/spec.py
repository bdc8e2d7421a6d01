"""From a composed config to a validated model spec, before any tensor exists.

`resolve_spec` checks the `model.` numbers, turns each group node into its
plugin's params dataclass, and runs each params' `validate(model, key)` hook
(declared by `ComponentParams`, which every component node derives from).
Every failure is a `ConfigError` naming the key path, the value and what
would be valid.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from ..plugin import registry as plugins
from ..plugin.interfaces import PositionEncoding
from ..errors import ConfigError, valid_divisors, valid_range  # noqa: F401 (re-exported)
from . import match
from .layer_patterns import LAYER_GROUPS, STACKS, layer_node, parse_rules
from .scale import apply_scale
from .schema import ModelConfig
from .structured import to_dataclass
from .usage import unused


@dataclass(frozen=True)
class ModelSpec:
    model: ModelConfig  # with head_dim filled in
    params: Mapping[str, Any]  # group -> the plugin's params (with .plugin and .name)
    # (stack, layer) -> group -> params, for the layers a layer_pattern rule changes
    layer_params: Mapping[tuple[str, int], Mapping[str, Any]] = field(default_factory=dict)
    # model keys a preset set that no chosen plugin reads (the card lists them)
    unused: tuple[str, ...] = ()
    # what `model.match` set (config/match.py); None where nothing was matched
    match: Optional[match.Match] = None

    def params_for(self, group: str, layer: Optional[int] = None, stack: str = "decoder") -> Any:
        if layer is not None:
            changed = self.layer_params.get((stack, layer), {})
            if group in changed:
                return changed[group]
        return self.params[group]

    def plugin(self, group: str, layer: Optional[int] = None, stack: str = "decoder") -> plugins.PluginInfo:
        return plugins.get(group, self.params_for(group, layer, stack).plugin)

    @property
    def components(self) -> dict[str, str]:
        """group -> the choice's name (`mqa`), as typed by the user."""
        return {g: self.params[g].name for g in plugins.GROUPS}


def make_params(group: str, node: DictConfig | Mapping[str, Any]) -> Any:
    """A composed component node as its plugin's params dataclass (typed and checked)."""
    plugin_name = node.get("plugin") if node is not None else None
    if not plugin_name:
        raise ConfigError(f"{group}.plugin", plugin_name, "every group node names its plugin", plugins.names(group))
    return to_dataclass(plugins.get(group, plugin_name).node, node, group)


def make_choice(group: str, node: DictConfig | Mapping[str, Any] | None) -> Any:
    """A composed node of a choice group (task, data, ...) as its registered dataclass."""
    name = node.get("name") if node is not None else None
    return to_dataclass(plugins.get(group, name).params, node, group)


def divisors(n: int) -> list[int]:
    """Every divisor of `n`, ascending (trial division up to the square root)."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


#: Upper bounds far beyond any published model, so that an impossible value fails
#: here at once instead of in a build that takes minutes or allocates until memory
#: runs out (the card builds every layer on meta, about a millisecond each; RoPE's
#: frequencies are made per head dimension in Python). The deepest transformers have
#: about a thousand layers, the widest a model width near 20k, the largest
#: vocabularies about 256k tokens, the most experts a few hundred. Every integer of
#: the schema has one (tests/test_properties.py checks that none is missing).
WIDTH = 1 << 20
MAX_SIZES = {
    "n_layers": 10_000, "d_model": WIDTH, "head_dim": WIDTH, "n_heads": 1 << 16, "n_kv_heads": 1 << 16,
    "ffn_dim": WIDTH, "expert_ffn_dim": WIDTH, "embedding_dim": WIDTH, "vocab_size": 1 << 24,
    "max_seq_len": 1 << 30, "window": 1 << 30, "type_vocab_size": 1 << 20, "position_offset": 1 << 20,
    "q_lora_rank": WIDTH, "kv_lora_rank": WIDTH, "qk_rope_head_dim": WIDTH, "qk_nope_head_dim": WIDTH,
    "v_head_dim": WIDTH, "n_experts": 1 << 20, "experts_per_token": 1 << 20, "n_shared_experts": 1 << 10,
    "n_expert_groups": 1 << 20, "topk_expert_groups": 1 << 20, "expert_capacity": 1 << 30,
    "match_multiple": WIDTH,
}
#: Token ids: -1 is a common "none" in Hugging Face configs; ids are stored as int32 or less.
TOKEN_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
TOKEN_RANGE = (-1, (1 << 31) - 1)
#: A float must be finite in float32, the widest dtype a model computes in here.
FLOAT32_MAX = 3.4028234663852886e38


def _require_positive(model: ModelConfig, *keys: str) -> None:
    for key in keys:
        value = getattr(model, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.{key}", value, "must be positive", "a number > 0")


def _require_token_ids(model: ModelConfig) -> None:
    low, high = TOKEN_RANGE
    for key in TOKEN_FIELDS:
        value = getattr(model, key)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high):
                raise ConfigError(f"model.{key}", value, "a token id is an integer", f"{low}..{high}, or null")


def _require_finite(model: ModelConfig) -> None:
    """Every number is finite (in float32), not negative, and an integer within its bound."""
    for f in dataclasses.fields(model):
        value = getattr(model, f.name)
        if f.name in TOKEN_FIELDS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value) or value < 0 or abs(value) > FLOAT32_MAX:
            raise ConfigError(f"model.{f.name}", value, "must be a finite number >= 0", "a number >= 0")
        if isinstance(value, int) and f.name in MAX_SIZES and value > MAX_SIZES[f.name]:
            raise ConfigError(f"model.{f.name}", value, f"is beyond any buildable model (at most "
                              f"{MAX_SIZES[f.name]})", f"0..{MAX_SIZES[f.name]}")
    _require_token_ids(model)


def validate_model(model: ModelConfig) -> ModelConfig:
    _require_finite(model)
    _require_positive(model, "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                      "max_seq_len", "norm_eps", "rope_theta", "n_experts", "experts_per_token")
    if model.head_dim is None:
        if model.d_model % model.n_heads:
            raise ConfigError("model.n_heads", model.n_heads, f"must divide model.d_model={model.d_model} "
                              "(or set model.head_dim)", valid_divisors(model.d_model, model.n_heads))
        model = dataclasses.replace(model, head_dim=model.d_model // model.n_heads)
    else:
        _require_positive(model, "head_dim")
    if not 0.0 < model.rotary_fraction <= 1.0:
        raise ConfigError("model.rotary_fraction", model.rotary_fraction, "must lie in (0, 1]", "0 < x <= 1")
    if model.window is not None and model.window < 1:
        raise ConfigError("model.window", model.window, "a window must hold at least one token",
                          "an integer >= 1, or null for no window")
    if model.attention_softcap is not None and not model.attention_softcap > 0:
        raise ConfigError("model.attention_softcap", model.attention_softcap, "the cap on the attention scores "
                          "must be positive", "a number > 0 (Gemma-2: 50.0), or null for none")
    return model


def resolve_spec(cfg: DictConfig) -> ModelSpec:
    """Validate `cfg` and return the typed spec the builder consumes: at its `scale`, with
    the dimension `model.match` moves set (config/match.py)."""
    unset = tuple(unused(cfg))  # before scaling, which resolves the model's own interpolations
    scaled = apply_scale(cfg)
    spec = dataclasses.replace(resolve_scaled(scaled), unused=unset)
    if spec.model.match is None:
        return spec
    return match.matched_spec(cfg, scaled, spec, resolve_scaled)


def resolve_scaled(cfg: DictConfig) -> ModelSpec:
    """The spec of a config already at its scale, as it stands (nothing matched)."""
    model = to_dataclass(ModelConfig, cfg.model, "model")
    model = validate_model(model)
    match.check_keys(model)
    params = {}
    for group in plugins.GROUPS:
        node = cfg.get(group)
        if node is None:
            raise ConfigError(group, None, "no choice made for this group", plugins.names(group))
        p = make_params(group, node)
        try:
            p.validate(model, group)
        except ConfigError as exc:
            raise _blame_source(exc, cfg) from None
        params[group] = p
    layer_params = resolve_layers(cfg, model, params)
    _check_read_elsewhere(params, layer_params, cfg)
    # The model-wide window only: scale=tiny shrinks it, not a layer rule's own (gpt3's 256).
    _check_window(params["attention"], model, cfg)
    return ModelSpec(model=model, params=params, layer_params=layer_params)


def _check_read_elsewhere(params: Mapping[str, Any], layer_params: Mapping, cfg: DictConfig) -> None:
    """A position field its own plugin does not read (`read_elsewhere`) must be read by an
    attention plugin of some layer (`reads_from_position`), else it would be ignored."""
    unread = getattr(params["position"], "read_elsewhere", dict)()
    if not unread:
        return
    chosen = {params["attention"].plugin, *(p["attention"].plugin for p in layer_params.values() if "attention" in p)}
    readers = {name: getattr(plugins.get("attention", name).cls, "reads_from_position", ())
               for name in plugins.names("attention")}
    for field, (value, own_reader) in unread.items():
        if not any(field in readers[name] for name in chosen):
            others = sorted(name for name, read in readers.items() if field in read)
            raise _blame_source(ConfigError(f"position.{field}", value, f"no chosen plugin reads it: {own_reader}"
                                            + (f"; {' and '.join(others)} attention reads it" if others else ""),
                                            ["null", *(f"attention={o}" for o in others)]), cfg)


def _check_window(params: Any, model: ModelConfig, cfg: DictConfig) -> None:
    """A sliding window longer than the context is no window: the run would not be what was asked."""
    window = getattr(params, "window", None)
    if window is not None and window > model.max_seq_len:
        raise _blame_source(ConfigError("attention.window", window,
                                        f"longer than model.max_seq_len={model.max_seq_len}",
                                        f"1 .. {model.max_seq_len}, or null for no window"), cfg)


def resolve_layers(cfg: DictConfig, model: ModelConfig, params: Mapping[str, Any]) -> dict:
    """Params of every layer a `model.layer_pattern` rule changes, validated like the rest.

    Rules apply in order, each to the node the earlier ones left: `{every: 2, ffn: moe}`
    then `{layers: [4], ffn: {hidden: 32}}` makes layer 4 a narrower MoE layer.
    """
    rules = parse_rules(model.layer_pattern)
    if not rules:
        return {}
    stacks = plugins.get("topology", params["topology"].plugin).cls.stacks
    for rule in rules:  # a rule that changes nothing is a mistake in the rule
        if not any(rule.selects(layer, stack) for stack in stacks for layer in range(model.n_layers)):
            raise ConfigError(rule.key, _rule_text(cfg, rule), f"selects no layer of {model.n_layers} "
                              f"in the {' and '.join(stacks)} stack(s)", "selectors that match a layer")
    model_numbers = OmegaConf.to_container(cfg.model, resolve=True)
    base = {g: OmegaConf.to_container(cfg[g], resolve=True) for g in LAYER_GROUPS}
    out: dict[tuple[str, int], dict[str, Any]] = {}
    cache: dict[tuple[str, tuple[int, ...]], Any] = {}  # (group, rules applied) -> params
    for stack in STACKS:
        for layer in range(model.n_layers):
            applied = [i for i, rule in enumerate(rules) if rule.selects(layer, stack)]
            for group in LAYER_GROUPS:
                chain = tuple(i for i in applied if group in rules[i].changes)
                if not chain:
                    continue
                if (group, chain) not in cache:
                    node = base[group]
                    for i in chain:
                        key = f"{rules[i].key}.{group}"
                        node = layer_node(node, rules[i].changes[group], group, model_numbers, key)
                    p = make_params(group, node)
                    p.validate(model, f"{rules[chain[-1]].key}.{group}")
                    if group == "position":
                        _check_layer_position(p, params["position"], f"{rules[chain[-1]].key}.position")
                    cache[group, chain] = p
                out.setdefault((stack, layer), {})[group] = cache[group, chain]
    return out


def _check_layer_position(layer: Any, base: Any, key: str) -> None:
    """A layer's own position params: the model-wide plugin, one that only rotates q and k
    (the embeddings are shared by every layer, and so are the score biases the masks carry)."""
    if layer.plugin != base.plugin:
        raise ConfigError(f"{key}.plugin", layer.plugin, f"a layer keeps the model-wide position plugin "
                          f"({base.plugin}); a rule changes its params only", [base.plugin])
    cls = plugins.get("position", layer.plugin).cls
    rotates = cls.rotate is not PositionEncoding.rotate
    shared = cls.embed is not PositionEncoding.embed or cls.cached_bias is not PositionEncoding.cached_bias
    if not rotates or shared:
        raise ConfigError(key, layer.plugin, "only a position plugin that acts by rotating q and k alone "
                          "(no embedding, no score bias) can differ from layer to layer", ["rope", "rope_2d"])


def _rule_text(cfg: DictConfig, rule: Any) -> Any:
    index = int(rule.key.rpartition("[")[2].rstrip("]"))
    return OmegaConf.to_container(cfg.model.layer_pattern[index], resolve=False)


def _blame_source(exc: ConfigError, cfg: DictConfig) -> ConfigError:
    """Name the key the user set: `position.fraction` reads `${model.rotary_fraction}`,
    so a bad fraction is reported as model.rotary_fraction."""
    node = cfg
    try:
        for part in exc.key.split("."):
            node = node._get_node(part)
    except (AttributeError, KeyError, TypeError):
        return exc
    if node is None or not node._is_interpolation():
        return exc
    source = str(node._value()).strip()
    if not (source.startswith("${") and source.endswith("}")) or ":" in source:
        return exc
    return ConfigError(source[2:-1], exc.value, f"{exc.problem} (read as {exc.key})", exc.valid)
