"""`task=table`: the survey's comparison table regenerated from the presets."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmarch_compose as lc
from llmarch_compose.model.card import architecture_card
from llmarch_compose.errors import ConfigError
from llmarch_compose.config.spec import resolve_spec
from llmarch_compose.plugin import registry
from llmarch_compose.tasks import table


def run_table(*overrides: str) -> tuple[dict, str]:
    cfg = lc.compose(["task=table", *overrides])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = table.run(cfg)
    return result, out.getvalue()


@pytest.fixture(scope="module")
def compared() -> tuple[dict, str]:
    """The JSON table with the survey comparison, and what the task printed. It composes
    every preset (about half a second each), so the tests that read it are in the slow tier."""
    return run_table("task.format=json", "task.compare_survey=true")


@pytest.fixture(scope="module")
def rows(compared) -> dict[str, dict]:
    return {r["model"]: r for r in compared[0]["rows"]}


def card(preset: str) -> dict:
    return architecture_card(resolve_spec(lc.compose([f"model={preset}"])))


def test_task_is_registered():
    assert "table" in registry.names("task")
    cfg = lc.compose(["task=table"])
    assert (cfg.task.name, cfg.task.format, cfg.task.compare_survey) == ("table", "markdown", False)


@pytest.mark.slow
def test_json_prints_one_object_equal_to_the_result(compared):
    result, printed = compared
    assert json.loads(printed) == json.loads(json.dumps(result))
    assert len(printed.strip().splitlines()) == 1


@pytest.mark.slow
def test_one_row_per_preset_without_tiny(rows):
    assert sorted(rows) == table.preset_names()
    assert "tiny" not in rows
    assert {"gpt3", "llama2_7b", "mixtral_8x7b", "bert_base", "t5_base"} <= set(rows)


@pytest.mark.slow
def test_every_survey_row_appears_in_the_surveys_order(compared, rows):
    survey_names = [r.model for r in table.SURVEY_TABLE]
    assert survey_names == ["GPT-3.5", "LLaMA-2", "LLaMA-3", "Qwen-2", "ChatGLM-3", "Baichuan-2", "Mistral-7B",
                          "Mixtral-8x7B", "BERT", "T5"]
    order = [r["survey_row"] for r in compared[0]["rows"]]
    tabled = [name for name in order if name]
    assert list(dict.fromkeys(tabled)) == survey_names  # each row, in order, contiguous
    assert order == tabled + [""] * (len(order) - len(tabled))  # then the named-only presets
    assert rows["gpt3"]["survey_row"] == "GPT-3.5"
    assert {n for n, r in rows.items() if r["survey_row"] == "LLaMA-2"} == {"llama2_7b", "llama2_13b", "llama2_70b"}
    assert {n for n, r in rows.items() if r["survey_row"] == "LLaMA-3"} >= {"llama3_8b", "llama3_70b", "llama3_1_405b"}
    assert rows["chatglm3_6b"]["survey_row"] == "ChatGLM-3"
    assert rows["flan_t5_base"]["survey_row"] == "" and rows["roberta_base"]["survey_row"] == ""
    assert rows["chatglm_6b"]["survey_row"] == ""


def test_named_only_presets_follow_in_the_surveys_order_and_new_ones_are_picked_up():
    names = ["zeta_1b", "deepseek_v3", "gpt2", "llama2_7b", "switch_base_8", "t5_base", "bart_base"]
    totals = dict.fromkeys(names, 1)
    assert table.ordered_presets(names, totals) == [
        "llama2_7b", "t5_base", "gpt2", "bart_base", "switch_base_8", "deepseek_v3", "zeta_1b"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["llama2_7b", "t5_base", "mixtral_8x7b", "gpt3"])
def test_counts_are_the_architecture_cards(rows, preset):
    c = card(preset)
    assert rows[preset]["params_total"] == c["params_total"]
    assert rows[preset]["params_active"] == c["params_active"]
    assert rows[preset]["max_seq_len"] == c["dimensions"]["max_seq_len"]


@pytest.mark.slow
def test_known_exact_counts(rows):
    assert rows["llama2_7b"]["params_total"] == 6_738_415_616
    assert rows["t5_base"]["params_total"] == 222_903_552
    assert rows["bert_base"]["params_total"] == 109_514_298
    assert rows["mixtral_8x7b"]["params_total"] == 46_702_792_704
    assert rows["mixtral_8x7b"]["params_active"] == 12_879_925_248


@pytest.mark.slow
def test_cells(rows):
    def cells(name):
        r = rows[name]
        return (r["type"], r["position"], r["norm"], r["activation"], r["attention"], r["parameters"], r["context"])

    assert cells("llama2_7b") == ("Decoder-Only", "RoPE", "RMSNorm", "SwiGLU", "MHA", "6.74B", "4K")
    assert cells("llama2_70b")[4] == "GQA"
    assert cells("mistral_7b")[4:] == ("SWA+GQA", "7.24B", "32K")
    assert cells("mixtral_8x7b") == ("Decoder-Only (MoE)", "RoPE", "RMSNorm", "SwiGLU", "GQA",
                                     "46.7B (active 12.9B)", "32K")
    assert cells("gpt2") == ("Decoder-Only", "Absolute (learned)", "LayerNorm", "GELU", "MHA", "124M", "1K")
    assert cells("gpt3")[4:] == ("MHA + local (every 2nd layer)", "175B", "2K")
    assert cells("bert_base") == ("Encoder-Only", "Absolute (learned)", "LayerNorm", "GELU", "bidirectional MHA",
                                  "110M", "512")
    assert cells("t5_base") == ("Encoder-Decoder", "Relative (T5 buckets)", "RMSNorm", "ReLU", "MHA", "223M", "512")
    assert cells("chatglm3_6b")[:5] == ("Decoder-Only", "RoPE (partial)", "RMSNorm", "SwiGLU", "GQA")
    assert cells("chatglm_6b")[:2] == ("Prefix-Decoder", "RoPE (2D)")
    assert cells("llama3_1_405b")[6] == "128K"
    assert cells("baichuan2_13b")[1] == "ALiBi"
    assert cells("flan_t5_base")[3] == "GeGLU"


def differs(rows, preset) -> dict[str, tuple[str, str]]:
    return {d["column"]: (d["survey"], d["published"]) for d in rows[preset]["survey_differs"]}


@pytest.mark.slow
def test_compare_survey_flags_the_known_differences(rows):
    assert differs(rows, "llama2_7b") == {"attention": ("GQA", "MHA")}
    assert differs(rows, "llama2_13b") == {"attention": ("GQA", "MHA")}
    assert differs(rows, "mixtral_8x7b") == {"attention": ("SWA+GQA", "GQA")}
    assert differs(rows, "llama3_8b") == {"context": ("128K", "8K")}
    assert differs(rows, "llama3_1_405b") == {}
    glm = differs(rows, "chatglm3_6b")
    assert glm["norm"] == ("LayerNorm", "RMSNorm")
    assert glm["activation"] == ("GELU", "SwiGLU")
    assert glm["type"] == ("Prefix-Decoder", "Decoder-Only")
    assert glm["attention"] == ("MQA", "GQA")
    assert glm["context"] == ("32K", "8K")
    assert "context" in differs(rows, "gpt3")


@pytest.mark.slow
def test_compare_survey_accepts_what_agrees(rows):
    assert "attention" not in differs(rows, "llama2_70b")
    assert differs(rows, "mistral_7b") == {}  # SWA+GQA with its window; 32K inside 8K-32K
    assert differs(rows, "bert_base") == {}  # "Absolute" is any absolute encoding; 110M inside 110M-340M
    assert differs(rows, "bert_large") == {}
    for name in ("qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_72b"):  # "MHA/GQA", 0.5B-72B, 32K-128K
        assert differs(rows, name) == {}
    assert differs(rows, "baichuan2_7b") == {}
    assert differs(rows, "t5_base") == {"norm": ("LayerNorm", "RMSNorm")}
    assert "parameters" in differs(rows, "t5_small")  # 60.5M is below the survey's 220M-11B
    for name, row in rows.items():
        if not row["survey_row"]:
            assert row["survey_differs"] == []


@pytest.mark.slow
def test_compare_survey_json_carries_the_survey_table(compared):
    result = compared[0]
    assert result["columns"][-1] == "survey_differs"
    survey = {r["model"]: r for r in result["survey_table"]}
    assert survey["Mixtral-8x7B"]["parameters"] == "47B (active 13B)"
    assert survey["BERT"]["attention"] == "bidirectional MHA"
    assert survey["T5"]["position"] == "Relative"


@pytest.mark.slow  # composes every preset
def test_markdown_has_a_header_and_one_line_per_preset():
    result, printed = run_table()
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert lines[0] == "| model | survey row | type | position | norm | activation | attention | parameters | context |"
    assert set(lines[1].replace("|", "").replace(":", "")) == {"-"}
    assert len(lines) == 2 + len(table.preset_names())
    assert [line.split("|")[1].strip() for line in lines[2:]] == [r["model"] for r in result["rows"]]
    assert "survey differs" not in printed and "survey_differs" not in result["rows"][0]


@pytest.mark.slow  # composes every preset
def test_markdown_with_compare_survey():
    _, printed = run_table("task.compare_survey=true")
    header, _, *body = printed.strip().splitlines()
    assert header.endswith("| survey differs |")
    llama = next(line for line in body if line.startswith("| llama2_7b |"))
    assert llama.endswith("| attention: survey GQA, published MHA |")
    llama3 = next(line for line in body if line.startswith("| llama3_8b |"))
    assert "context: survey 128K, published 8K" in llama3


def test_bad_format_is_a_config_error():
    with pytest.raises(ConfigError) as info:
        table.table_for(lc.compose(["task=table", "task.format=xml"]))
    err = info.value
    assert (err.key, err.value) == ("task.format", "xml")
    assert "markdown" in str(err) and "json" in str(err)


@pytest.mark.parametrize("overrides, column, expected", [
    (["attention=mla"], "attention", "MLA"),
    (["attention=mqa"], "attention", "MQA"),
    (["attention=swa"], "attention", "SWA+GQA"),
    (["attention=mha", "topology=encoder_only"], "attention", "bidirectional MHA"),
    (["model.layer_pattern=[{every: 3, offset: 0, attention: {window: 8}}]", "attention=mha"], "attention",
     "MHA + local (every 3rd layer)"),
    (["ffn=moe"], "type", "Decoder-Only (MoE)"),
    (["model.layer_pattern=[{stop: 1, ffn: moe}]"], "type", "Decoder-Only (MoE)"),
    (["topology=encoder_decoder"], "type", "Encoder-Decoder"),
    (["position=sinusoidal"], "position", "Absolute (sinusoidal)"),
    (["position=none"], "position", "none"),
    (["position=alibi"], "position", "ALiBi"),
    (["model.rotary_fraction=0.5"], "position", "RoPE (partial)"),
    (["norm=layernorm"], "norm", "LayerNorm"),
    (["activation=gelu_tanh"], "activation", "GELU"),
    (["activation=relu"], "activation", "ReLU"),
])
def test_labels_follow_the_plugins(overrides, column, expected):
    spec = resolve_spec(lc.compose(overrides))
    own = lambda s: table.label(s, column, s.params[column])  # the plugin's own table_label  # noqa: E731
    label = {"attention": table.attention_of, "type": table.type_of}.get(column, own)(spec)
    assert label == expected


def test_formatting_and_matching():
    assert [table.format_count(n) for n in (6_738_415_616, 124_439_808, 174_604_259_328, 46_702_792_704,
                                             999_700_000, 512)] == ["6.74B", "124M", "175B", "46.7B", "1B", "512"]
    assert [table.format_context(n) for n in (4096, 131072, 512, 32768, 1026)] == ["4K", "128K", "512", "32K", "1026"]
    assert table.parameters_match("7B/13B/70B", 13_015_864_320, 13_015_864_320)
    assert not table.parameters_match("7B/13B/70B", 30_000_000_000, 30_000_000_000)
    assert table.parameters_match("0.5B-72B", 30_000_000_000, 30_000_000_000)
    assert table.parameters_match("47B (active 13B)", 46_702_792_704, 12_879_925_248)
    assert not table.parameters_match("47B (active 13B)", 46_702_792_704, 46_702_792_704)
    assert table.context_match("8K-32K", 16384) and table.context_match("4K", 4096)
    assert not table.context_match("128K", 8192)
    row = {"attention": "GQA"}
    assert table.cell_matches("attention", "MHA/GQA", row) and table.cell_matches("attention", "gqa", row)
    assert not table.cell_matches("attention", "SWA+GQA", row)


# ------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_cli_prints_the_markdown_table(tmp_path: Path):
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, "-m", "llmarch_compose", "task=table", "task.compare_survey=true"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0].startswith("| model | survey row | type |") and lines[0].endswith("| survey differs |")
    assert len(lines) == 2 + len(table.preset_names())
    assert any(line.startswith("| mixtral_8x7b |") and "46.7B (active 12.9B)" in line for line in lines)


@pytest.mark.slow
def test_cli_rejects_an_unknown_format(tmp_path: Path):
    proc = subprocess.run([sys.executable, "-m", "llmarch_compose", "task=table", "task.format=xml"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "task.format='xml'" in proc.stderr and "markdown" in proc.stderr and "Traceback" not in proc.stderr
