"""`task=table`: the survey's comparison table, regenerated from the presets.

One row per preset (every `conf/model/*.yaml` but `tiny`), each cell derived from
the resolved spec and the parameter counts from `architecture_card` on `meta`:
nothing in the table is typed by hand except the survey's own rows, which
`task.compare_survey=true` compares cell by cell with what the presets compute.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import importlib.resources
import json
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from ..config.compose import CONFIG_MODULE, VERSION_BASE, compose, presets
from ..model.card import architecture_card
from ..errors import ConfigError
from ..config.spec import ModelSpec, resolve_spec
from ..config.structured import to_dataclass
from ..plugin import registry as plugins
from ..plugin.interfaces import table_label
from ..plugin.registry import register

FORMATS = ("markdown", "json")
TEST_PRESET = "tiny"  # the test model: not a row of the table

#: (key in a row, Markdown header) of the compared columns, in the survey's order.
COLUMNS = (("type", "type"), ("position", "position"), ("norm", "norm"), ("activation", "activation"),
           ("attention", "attention"), ("parameters", "parameters"), ("context", "context"))


@dataclass
class TableTask:
    name: str = "table"
    format: str = "markdown"  # markdown | json
    compare_survey: bool = False  # add the cells where the survey says otherwise


# --------------------------------------------------------------------------- the survey

@dataclass(frozen=True)
class SurveyRow:
    """One row of the survey's table (section 三), its Chinese cells rendered in English."""

    model: str
    type: str
    position: str
    norm: str
    activation: str
    attention: str
    parameters: str
    context: str
    presets: tuple[str, ...]  # fnmatch patterns of the preset names that instantiate this row


#: The survey's comparison table, in its order. Renderings: 绝对位置编码 -> Absolute,
#: 相对位置编码 -> Relative, 双向MHA -> bidirectional MHA, "47B (激活13B)" -> "47B (active 13B)".
SURVEY_TABLE = (
    SurveyRow("GPT-3.5", "Decoder-Only", "Absolute", "LayerNorm", "GELU", "MHA", "175B", "8K-32K",
            ("gpt3", "gpt3_5*")),  # GPT-3.5 has no published config: gpt3 is the survey's 175B
    SurveyRow("LLaMA-2", "Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "GQA", "7B/13B/70B", "4K", ("llama2_*",)),
    SurveyRow("LLaMA-3", "Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "GQA", "8B/70B/405B", "128K", ("llama3_*",)),
    SurveyRow("Qwen-2", "Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "MHA/GQA", "0.5B-72B", "32K-128K", ("qwen2_*",)),
    SurveyRow("ChatGLM-3", "Prefix-Decoder", "RoPE (2D)", "LayerNorm", "GELU", "MQA", "6B", "32K", ("chatglm3_*",)),
    SurveyRow("Baichuan-2", "Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "MHA", "7B/13B", "4K-32K", ("baichuan2_*",)),
    SurveyRow("Mistral-7B", "Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "SWA+GQA", "7B", "8K-32K", ("mistral_7b",)),
    SurveyRow("Mixtral-8x7B", "Decoder-Only (MoE)", "RoPE", "RMSNorm", "SwiGLU", "SWA+GQA", "47B (active 13B)", "32K",
            ("mixtral_8x7b",)),
    SurveyRow("BERT", "Encoder-Only", "Absolute", "LayerNorm", "GELU", "bidirectional MHA", "110M-340M", "512",
            ("bert_*",)),
    SurveyRow("T5", "Encoder-Decoder", "Relative", "LayerNorm", "ReLU", "MHA", "220M-11B", "512", ("t5_*",)),
)

#: Presets of models the survey names outside its table, in the order it names them
#: (sections 一 and 四): they follow the table's rows, with an empty survey row.
SURVEY_NAMED = ("gpt2", "gpt2_xl", "roberta_base", "albert_base", "flan_t5_base", "bart_base", "chatglm_6b",
              "switch_base_8", "deepseek_v3")


def survey_row_for(preset: str) -> Optional[SurveyRow]:
    return next((r for r in SURVEY_TABLE if any(fnmatch.fnmatchcase(preset, p) for p in r.presets)), None)


# --------------------------------------------------------------------------- the presets

def preset_names() -> list[str]:
    """Every architecture preset except the test model."""
    return [name for name in presets() if name != TEST_PRESET]


def _preset_source(name: str) -> str:
    return (importlib.resources.files("llmarch_compose.conf") / "model" / f"{name}.yaml").read_text()


@contextlib.contextmanager
def _hydra() -> Iterator[None]:
    """One Hydra initialization for all the presets (inside `llmarch` it already exists)."""
    if GlobalHydra.instance().is_initialized():
        yield
        return
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
        yield


def label(spec: ModelSpec, group: str, params: Any) -> str:
    """The plugin's own cell for `params` (its `table_label` hook)."""
    return table_label(plugins.get(group, params.plugin).cls, params, spec.model)


def _all_params(spec: ModelSpec, group: str) -> list[Any]:
    return [spec.params[group], *(p[group] for p in spec.layer_params.values() if group in p)]


def type_of(spec: ModelSpec) -> str:
    moe = any(plugins.get("ffn", p.plugin).cls.mixture_of_experts for p in _all_params(spec, "ffn"))
    return label(spec, "topology", spec.params["topology"]) + (" (MoE)" if moe else "")


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _which_layers(layers: set[int], n_layers: int) -> str:
    ordered = sorted(layers)
    for every in range(2, n_layers + 1):
        offset = ordered[0] % every
        if set(range(offset, n_layers, every)) == layers:
            return f"every {_ordinal(every)} layer"
    if ordered == list(range(ordered[0], ordered[-1] + 1)):
        return f"layers {ordered[0]}-{ordered[-1]}" if len(ordered) > 1 else f"layer {ordered[0]}"
    return f"{len(ordered)} of {n_layers} layers"


def attention_of(spec: ModelSpec) -> str:
    base = label(spec, "attention", spec.params["attention"])
    text = f"bidirectional {base}" if spec.params["topology"].plugin == "encoder_only" else base
    others: dict[str, set[int]] = {}  # a per-layer kind other than the base one -> its layers
    for (stack, layer), changed in spec.layer_params.items():
        if "attention" not in changed:
            continue
        kind = label(spec, "attention", changed["attention"])
        if kind == base:
            continue
        if kind == "SWA+" + base:
            kind = "local"
        others.setdefault(kind, set()).add(layer)
    for kind, layers in others.items():
        text += f" + {kind} ({_which_layers(layers, spec.model.n_layers)})"
    return text


def format_count(n: float) -> str:
    """6738415616 -> 6.74B, 124439808 -> 124M: three significant digits."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale * 0.9995:
            text = f"{n / scale:.3g}"
            if float(text) >= 1000 and suffix != "T":
                continue  # rounds up into the next unit
            return text + suffix
    return str(int(n))


def format_context(n: int) -> str:
    """4096 -> 4K, 131072 -> 128K, 512 -> 512."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n >= 1024 and n % 1024 == 0:
        return f"{n >> 10}K"
    return str(n)


@functools.lru_cache(maxsize=None)
def _preset_row(name: str, source: str) -> dict[str, Any]:
    """The computed cells of one preset (cached per preset file text within a process)."""
    spec = resolve_spec(compose([f"model={name}"]))
    card = architecture_card(spec)
    total, active = card["params_total"], card["params_active"]
    parameters = format_count(total) + (f" (active {format_count(active)})" if active != total else "")
    return {
        "model": name,
        "type": type_of(spec),
        "position": label(spec, "position", spec.params["position"]),
        "norm": label(spec, "norm", spec.params["norm"]),
        "activation": label(spec, "activation", spec.params["activation"]),
        "attention": attention_of(spec),
        "parameters": parameters,
        "context": format_context(spec.model.max_seq_len),
        "params_total": total,
        "params_active": active,
        "max_seq_len": spec.model.max_seq_len,
        "components": dict(card["components"]),
    }


def ordered_presets(names: Sequence[str], totals: dict[str, int]) -> list[str]:
    """The survey table's rows in its order (each row's presets by size), then the presets
    the survey only names, then the rest by name."""
    out: list[str] = []
    for row in SURVEY_TABLE:
        out += sorted((n for n in names if survey_row_for(n) is row), key=lambda n: (totals[n], n))
    out += [n for n in SURVEY_NAMED if n in names and n not in out]
    out += [n for n in names if n not in out]
    return out


# --------------------------------------------------------------------------- comparing with the survey

def _norm(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMBT]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_size(text: str, binary: bool = False) -> float:
    """"6B" -> 6e9; with binary=True (contexts), "4K" -> 4096."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r}")
    unit = match.group(2).lower()
    scale = {"": 1, "k": 1 << 10, "m": 1 << 20}[unit] if binary else _UNITS[unit]
    return float(match.group(1)) * scale


def _alternatives(text: str, binary: bool) -> list[tuple[float, float]]:
    """"7B/13B/70B" -> three points; "0.5B-72B" -> one range; as (low, high) pairs."""
    out = []
    for part in text.split("/"):
        low, _, high = part.partition("-")
        out.append((parse_size(low, binary), parse_size(high or low, binary)))
    return out


def parameters_match(survey: str, total: int, active: int) -> bool:
    """Within 10% of a listed size, or inside a listed range (its ends with the same 10%);
    a listed active count ("47B (active 13B)") must match too."""
    match = re.match(r"^(.*?)\s*\(active\s*(.*?)\)\s*$", survey)
    listed, listed_active = (match.group(1), match.group(2)) if match else (survey, None)

    def near(text: str, n: int) -> bool:
        return any(low * 0.9 <= n <= high * 1.1 for low, high in _alternatives(text, binary=False))

    return near(listed, total) and (listed_active is None or near(listed_active, active))


def context_match(survey: str, n: int) -> bool:
    return any(low <= n <= high for low, high in _alternatives(survey, binary=True))


def _base(label: str) -> str:
    return label.split(" (")[0]


def cell_matches(column: str, survey: str, row: dict[str, Any]) -> bool:
    published = row[column]
    if column == "parameters":
        return parameters_match(survey, row["params_total"], row["params_active"])
    if column == "context":
        return context_match(survey, row["max_seq_len"])
    if column == "attention":  # "MHA/GQA" is either; "SWA+GQA" needs the window
        return any(_norm(alt) == _norm(published) for alt in survey.split("/"))
    if column == "position" and " (" not in survey:  # "Absolute" is any absolute encoding
        return _norm(survey) == _norm(_base(published))
    return _norm(survey) == _norm(published)


def survey_differences(row: dict[str, Any]) -> list[dict[str, str]]:
    survey = survey_row_for(row["model"])
    if survey is None:
        return []
    return [{"column": column, "survey": getattr(survey, column), "published": row[column]}
            for column, _ in COLUMNS if not cell_matches(column, getattr(survey, column), row)]


def describe_differences(diffs: Sequence[dict[str, str]]) -> str:
    return "; ".join(f"{d['column']}: survey {d['survey']}, published {d['published']}" for d in diffs)


# --------------------------------------------------------------------------- the task

def build_table(compare_survey: bool = False) -> list[dict[str, Any]]:
    names = preset_names()
    with _hydra():
        computed = {n: _preset_row(n, _preset_source(n)) for n in names}
    rows = []
    for name in ordered_presets(names, {n: r["params_total"] for n, r in computed.items()}):
        survey = survey_row_for(name)
        row = {"model": name, "survey_row": survey.model if survey else ""}
        row.update({k: v for k, v in computed[name].items() if k != "model"})
        row["components"] = dict(row["components"])
        if compare_survey:
            row["survey_differs"] = survey_differences(row)
        rows.append(row)
    return rows


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def render_markdown(rows: Sequence[dict[str, Any]], compare_survey: bool = False) -> str:
    headers = ["model", "survey row", *(h for _, h in COLUMNS)] + (["survey differs"] if compare_survey else [])
    right = {"parameters", "context"}
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if h in right else "---" for h in headers) + "|"]
    for row in rows:
        cells = [row["model"], row["survey_row"], *(row[k] for k, _ in COLUMNS)]
        if compare_survey:
            cells.append(describe_differences(row["survey_differs"]))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def table_for(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(TableTask, cfg.task, "task")
    if task.format not in FORMATS:
        raise ConfigError("task.format", task.format, "unknown output format", FORMATS)
    out: dict[str, Any] = {"columns": ["model", "survey_row", *(k for k, _ in COLUMNS)],
                           "rows": build_table(task.compare_survey)}
    if task.compare_survey:
        out["columns"].append("survey_differs")
        out["survey_table"] = [{k: v for k, v in vars(r).items() if k != "presets"} for r in SURVEY_TABLE]
    return out


@register("task", "table", params=TableTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    table = table_for(cfg)
    if cfg.task.format == "json":
        print(json.dumps(table))
    else:
        print(render_markdown(table["rows"], compare_survey="survey_table" in table))
    return table
