"""task=bench at test size: the report's structure, the same-weights check against
transformers, compile-time fields, the memory probe and the round robin. Timings
are never asserted: they depend on the machine."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY

import llmarch_compose as lc
from llmarch_compose import ConfigError
from llmarch_compose.bench import harness as bench
from llmarch_compose.tasks import run_task


def _load_script(name: str):
    """A benchmark script of benchmarks/ as a module (they hold the goals; the library only measures)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_llama = _load_script("bench_llama")

RUN = ["task=bench", "task.steps=2", "task.warmup=1", "task.batch_size=2", "task.seq_len=16", "device=cpu"]
NUMBERS = ("train_step_s", "train_tokens_per_s", "infer_step_s", "infer_tokens_per_s", "train_model_flops_per_s",
           "train_fraction_of_matmul", "train_vs_products", "train_peak_bytes", "resident_bytes")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    returned = run_task(lc.compose([*TINY, *RUN, f"task.output={out}"]))
    return out, returned


@pytest.mark.slow
def test_writes_json_and_markdown_with_every_variant(report):
    out, returned = report
    written = json.loads((out / "bench.json").read_text())
    assert written == json.loads(json.dumps(returned))  # what run returns is what it wrote
    assert set(written["variants"]) == {"eager", "compiled", "hf"}
    for name, row in written["variants"].items():
        for key in NUMBERS:
            assert row[key] > 0, (name, key)
        assert row["train_peak_bytes"] > row["resident_bytes"]  # the step allocates activations and gradients
        assert {"train_vs_hf", "infer_vs_hf", "memory_vs_hf"} <= set(row)
    assert written["variants"]["hf"]["train_vs_hf"] == 1.0
    assert written["tokens_per_step"] == 2 * 16 and written["params_total"] > 0
    assert written["matmul"]["size"] == 2048 and written["matmul"]["flops_per_s"] > 0
    assert "targets" not in written  # the goals are the scripts', not the report's
    assert written["step_products_s"] > 0  # the step's own products, timed in the same rounds
    assert len(bench_llama.targets(written)) == 7
    markdown = (out / "bench.md").read_text()
    for label in ("ours, eager", "ours, compiled", "Hugging Face (SDPA)", "litgpt is not installed"
                  if importlib.util.find_spec("litgpt") is None else "litgpt"):
        assert label in markdown


@pytest.mark.slow
def test_ours_and_transformers_agree_on_the_same_weights(report):
    checks = report[1]["checks"]
    assert checks["hf_logits_match"] is True and checks["hf_logits_max_abs_diff"] < 1e-4
    assert checks["compiled_logits_match"] is True and checks["compiled_logits_max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_compile_times_are_reported(report):
    compile_times = report[1]["compile"]
    assert compile_times["first_step_in_process_s"] > 0
    cold = compile_times["cold"]
    assert cold["n_layers"] == 2 and cold["first_step_s"] > 0 and "compile_s" in cold
    assert compile_times["by_depth"] == []  # task.compile_depths is empty


@pytest.mark.parametrize("preset", [[], ["model=llama3_8b", "scale=tiny"]])
def test_compile_probes_change_only_the_depth(preset):
    cfg = lc.compose([*TINY, *preset])
    deeper = bench.config_at_depth(cfg, 3)
    spec, spec3 = lc.resolve_spec(cfg), lc.resolve_spec(deeper)
    assert spec3.model.n_layers == 3 and spec.model.n_layers != 3
    assert dataclasses.replace(spec3.model, n_layers=spec.model.n_layers) == spec.model
    assert bench.config_at_depth(cfg, None) is cfg


def test_a_peer_with_other_weights_is_caught_and_left_out(tmp_path, monkeypatch):
    real = bench.hf_peer

    def perturbed(*args, **kwargs):
        hf, why = real(*args, **kwargs)
        with torch.no_grad():
            hf.lm_head.weight.add_(0.01)
        return hf, why

    monkeypatch.setattr(bench, "hf_peer", perturbed)
    options = bench.BenchOptions(steps=1, warmup=1, batch_size=1, seq_len=8, variants=("eager", "hf"),
                                 memory=False, cold_compile=False)
    result = bench.run_benchmark(lc.compose(TINY), options, tmp_path)
    assert result["checks"]["hf_logits_match"] is False
    assert set(result["variants"]) == {"eager"}
    assert any("not compared" in note for note in result["notes"])


def test_without_transformers_the_report_says_so(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else find_spec(name, *a))
    options = bench.BenchOptions(steps=1, warmup=1, batch_size=1, seq_len=8, variants=("eager", "hf"),
                                 memory=False, cold_compile=False)
    result = bench.run_benchmark(lc.compose(TINY), options, tmp_path)
    assert set(result["variants"]) == {"eager"}
    assert "Hugging Face peer: transformers is not installed" in result["notes"]
    assert "| ours, eager |" in bench.render_markdown(result) and "n/a" in bench.render_markdown(result)


def test_step_peak_counts_what_a_step_holds_at_once():
    def step():
        a = torch.ones(1 << 20)  # 4 MiB
        b = torch.ones(1 << 20)  # 4 MiB more while `a` lives
        del a, b
        torch.ones(1 << 19)  # 2 MiB after both are freed: not a new peak

    peak = bench.step_peak_bytes(step, torch.device("cpu"))
    assert 8 << 20 <= peak < (8 << 20) + (1 << 20)


def test_round_robin_alternates_and_skips_warm_up():
    calls = []
    seconds = bench.round_robin({n: (lambda n=n: calls.append(n)) for n in "abc"}, warmup=1, timed=3,
                                device=torch.device("cpu"))
    assert calls == list("abc" "bca" "cab" "abc")
    assert {n: len(s) for n, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}


@pytest.mark.parametrize("override, key", [("task.variants=[eager,vllm]", "task.variants"),
                                           ("task.seq_len=65", "task.seq_len"), ("task.warmup=0", "task.warmup")])
def test_bad_options_name_their_key(override, key):
    with pytest.raises(ConfigError) as info:
        run_task(lc.compose([*TINY, "task=bench", override]))
    assert info.value.key == key


def test_targets_compare_the_deepest_compile_with_the_shallowest():
    rows = {"compiled": {"train_vs_hf": 1.2, "infer_vs_hf": 1.0, "memory_vs_hf": 0.9, "train_fraction_of_matmul": 0.5,
                         "train_vs_products": 1.3}}
    times = {"cold": {"compile_s": 20.0}, "by_depth": [{"n_layers": 16, "compile_s": 12.0},
                                                       {"n_layers": 2, "compile_s": 10.0}]}
    met = {t["target"]: (t["value"], t["met"]) for t in bench_llama.targets({"variants": rows, "compile": times})}
    assert met["compile time, deepest / shallowest"] == (pytest.approx(1.2), True)
    assert met["training tokens/s vs HF"] == (1.2, True) and met["inference tokens/s vs HF"] == (1.0, False)
    assert met["peak training memory vs HF"] == (0.9, False) and met["cold compile (s)"] == (20.0, True)
    assert met["training step / its matrix products alone"] == (1.3, False)


def test_decode_benchmark_options_are_refused_by_key():
    from llmarch_compose.tasks.bench import BenchTask, decode_options

    for changes, key in (({"new_tokens": 1000}, "task.new_tokens"), ({"contexts": [512, 4096]}, "task.contexts"),
                         ({"decode_batch_sizes": []}, "task.decode_batch_sizes"), ({"prompt_len": 0}, "task.prompt_len")):
        with pytest.raises(lc.ConfigError) as exc:
            decode_options(BenchTask(**{"contexts": [128], **changes}), 1024)
        assert exc.value.key == key


@pytest.mark.slow
def test_decode_benchmark_measures_every_figure_and_the_cache_matches_the_card(tmp_path):
    from llmarch_compose.tasks import run_task

    report = run_task(lc.compose(["model=tiny", "model.d_model=32", "model.n_layers=1", "model.vocab_size=64",
                                  "model.max_seq_len=128", "task=bench", "task.mode=decode", "task.steps=1",
                                  "task.prompt_len=8", "task.new_tokens=4", "task.seq_len=16", "task.batch_size=2",
                                  "task.contexts=[16,64]", "task.hf_static=false", f"task.output={tmp_path}"]))
    assert report["kv_cache"]["allocated_bytes"] == report["kv_cache"]["card_bytes"] > 0
    assert [c["context"] for c in report["contexts"]] == [16, 64]
    assert all(c["compiled_s"] > 0 and c["eager_s"] > 0 for c in report["contexts"])
    assert set(report["decode"][0]["variants"]) >= {"ours eager", "ours compiled"}
    assert report["prefill"]["matmul_s"] > 0
    assert all(v["vs_matmul"] > 0 for v in report["prefill"]["variants"].values())
    claims = {c["attention"]: c for c in report["kv_claims"]}
    assert all(r == 1 / 32 for r in claims["mqa"]["vs_mha"].values())  # the seed: 1 / num_heads
    assert all(r == 1 / 8 for r in claims["gqa, 4 KV heads"]["vs_mha"].values())  # 32 query / 4 KV heads
    assert len(set(claims["swa, 256-token window"]["bytes"].values())) == 1  # flat in the length
    assert 0 < claims["mla (latent + rotary key)"]["vs_mha"][8192] < 1
    text = (tmp_path / "bench_decode.md").read_text()
    assert text.startswith("# Inference benchmark") and "| mqa | " in text


@pytest.mark.slow
def test_transformers_static_cache_compiles_once_and_matches_its_dynamic_cache():
    """The peer's compiled variant is transformers' own recipe (a static cache, its
    automatic compilation of the decoding step): it runs at two batch sizes without
    reaching Dynamo's recompile limit and decodes the tokens its dynamic cache does."""
    import transformers

    from llmarch_compose.bench.decode import hf_generate_fn

    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    for batch in (1, 2):
        ids = torch.randint(1, 64, (batch, 8), generator=g)
        with torch.no_grad():
            static = [hf_generate_fn(hf, ids, 6, static=True)() for _ in range(2)]
            dynamic = hf_generate_fn(hf, ids, 6, static=False)()
        assert static[0].shape == (batch, 14)
        assert torch.equal(static[0], dynamic) and torch.equal(static[1], dynamic)
