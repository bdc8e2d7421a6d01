"""Hugging Face interop for the LLaMA family (llama, mistral, qwen2, mixtral) and the
shared mechanism: logits parity with transformers on the same weights, round trips,
sharded checkpoints, and errors that name the tensor or field."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import llmarch_compose as lc
from llmarch_compose.errors import ConfigError
from llmarch_compose.interop.hf import InteropError, from_hf, to_hf

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=96, vocab_size=128, max_position_embeddings=64)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    "llama3_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0})),
    # Dynamic NTK past max_position_embeddings=16: IDS is 24 long, so the scaled base is used.
    "llama_dynamic_rope": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                           dict(max_position_embeddings=16, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama_mha_bias": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                       dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, dict(sliding_window=8)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2)),
}


def hf_model(case: str):
    config_cls, model_cls, extra = CASES[case]
    config = config_cls(**{**COMMON, **extra})
    config._attn_implementation = "eager"
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Router weights large enough that the top-k has no near ties.
            p.normal_(0, 1.0 if name.endswith("gate.weight") and "mlp.gate" in name else 0.08)
    return model


IDS = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=list(CASES))
def converted(request):
    hf = hf_model(request.param)
    cfg, model = from_hf(hf)
    return request.param, hf, cfg, model.eval()


def test_logits_match_transformers(converted):
    _, hf, _, model = converted
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_logits_match_transformers(converted):
    torch._dynamo.reset()
    _, hf, _, model = converted
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(IDS).logits, hf(IDS).logits,
                                   atol=1e-4, rtol=0)


def test_round_trip_loads_cleanly_in_transformers(converted, tmp_path):
    case, hf, cfg, model = converted
    out = to_hf(model, cfg, tmp_path / "out")
    back, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    back.config._experts_implementation = "eager"
    assert type(back) is type(hf)
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


def test_mixtral_router_choices_match():
    hf = hf_model("mixtral")
    _, model = from_hf(hf)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    _, _, theirs = hf.model.layers[1].mlp.gate(x)
    ours = model.decoder.blocks[1].ffn.route(x).chosen
    assert torch.equal(ours.sort(-1).values, theirs.sort(-1).values)


def test_sharded_checkpoint_folder(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    _, model = from_hf(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)


def test_config_maps_onto_groups_and_numbers():
    cfg, _ = from_hf(hf_model("mistral"))
    spec = lc.resolve_spec(cfg)
    assert spec.components["attention"] == "swa" and spec.params["attention"].window == 8
    assert spec.params["attention"].num_kv_heads == 2 and spec.model.ffn_dim == 96
    cfg, _ = from_hf(hf_model("llama3_rope"))
    assert lc.resolve_spec(cfg).params["position"].scaling.type == "llama3"


# ------------------------------------------------------------------ bad input

@pytest.fixture
def saved(tmp_path):
    hf_model("llama").save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def _edit_tensors(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(InteropError, match="model.layers.1.self_attn.k_proj.weight"):
        from_hf(saved)


def test_unexpected_tensor_is_named(saved):
    _edit_tensors(saved, lambda t: t.update({"model.layers.0.mystery.weight": torch.zeros(3)}))
    with pytest.raises(InteropError, match="mystery"):
        from_hf(saved)


def test_shape_mismatch_is_named(saved):
    _edit_tensors(saved, lambda t: t.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(InteropError, match=r"model.norm.weight|decoder.final_norm.weight"):
        from_hf(saved)


@pytest.mark.parametrize("field, value, key", [
    ("model_type", "mamba", "model_type"),
    ("pretraining_tp", 2, "pretraining_tp"),
    ("hidden_act", "softplus", "hidden_act"),
    ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}, "rope_scaling.rope_type"),
])
def test_unrepresentable_config_field_is_named(saved, field, value, key):
    config = json.loads((saved / "config.json").read_text())
    config[field] = value
    config.pop("rope_parameters", None) if field == "rope_scaling" else None
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as info:
        from_hf(saved)
    assert info.value.key == key


def test_a_failed_write_leaves_no_folder(tmp_path, monkeypatch):
    hf = hf_model("llama")
    cfg, model = from_hf(hf)
    import llmarch_compose.interop.hf as interop

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(interop, "save_file", broken)
    with pytest.raises(OSError):
        to_hf(model, cfg, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_not_overwritten(tmp_path):
    cfg, model = from_hf(hf_model("llama"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(InteropError, match="exists"):
        to_hf(model, cfg, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.slow  # a fresh interpreter
def test_package_never_imports_transformers(saved):
    code = ("import sys, torch, llmarch_compose as lc\n"
            "from llmarch_compose.interop.hf import from_hf\n"
            f"cfg, m = from_hf({str(saved)!r})\n"
            "m(torch.zeros(1, 4, dtype=torch.long))\n"
            "lc.build(lc.compose(['model=mixtral_8x7b', 'scale=tiny']))\n"
            "print('transformers' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_cli_builds_and_exports_from_a_checkpoint_folder(saved, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "llmarch_compose", *a],  # noqa: E731
                                    capture_output=True, text=True, cwd=tmp_path)
    card = run("model=hf", f"model.path={saved}", "task=summary", "task.format=json")
    assert card.returncode == 0, card.stderr
    hf = hf_model("llama")
    assert json.loads(card.stdout)["params_total"] == sum(p.numel() for p in hf.parameters())
    export = run("model=hf", f"model.path={saved}", "task=export_hf", f"task.output={tmp_path / 'again'}")
    assert export.returncode == 0, export.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again", attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, hf(IDS).logits, atol=1e-4, rtol=0)
    refused = run("task=export_hf", f"task.output={tmp_path / 'random'}")
    assert refused.returncode == 2 and "task.checkpoint" in refused.stderr and "Traceback" not in refused.stderr


def test_model_hf_without_a_path_is_refused():
    with pytest.raises(ConfigError) as info:
        lc.compose(["model=hf"])
    assert info.value.key == "model.path"


def test_a_model_tensor_no_rule_writes_is_refused(tmp_path, monkeypatch):
    """A tensor the table would leave out (here the FFN norms) is named, and nothing is written."""
    import dataclasses

    from llmarch_compose.plugin import registry

    cfg, model = from_hf(hf_model("llama"))
    info = registry.get("hf_model_type", "llama")
    partial = dataclasses.replace(info.target, tensors=lambda spec: [r for r in info.target.tensors(spec)
                                                                      if "ffn_norm" not in r.ours])
    monkeypatch.setitem(registry._registry["hf_model_type"], "llama", dataclasses.replace(info, target=partial))
    with pytest.raises(InteropError, match=r"decoder\.blocks\.0\.ffn_norm\.weight"):
        to_hf(model, cfg, tmp_path / "out", model_type="llama")
    assert not (tmp_path / "out").exists()


def test_token_ids_dtype_and_generation_config_are_written(tmp_path):
    hf = hf_model("llama")  # LlamaConfig's bos 1 and eos 2
    hf.config.pad_token_id = 0
    cfg, model = from_hf(hf)
    m = lc.resolve_spec(cfg).model
    assert (m.bos_token_id, m.eos_token_id, m.pad_token_id) == (1, 2, 0)
    out = to_hf(model, cfg, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                          "pad_token_id": 0}
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager")
    assert (back.generation_config.bos_token_id, back.generation_config.pad_token_id) == (1, 0)
    assert back.dtype == torch.float32
    half = to_hf(model.to(torch.bfloat16), cfg, tmp_path / "bf16")
    assert json.loads((half / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Stating none: no generation_config.json, and null ids rather than LlamaConfig's defaults.
    cfg = lc.compose(["model=tiny", "scale=tiny"])
    plain = to_hf(lc.build(cfg), cfg, tmp_path / "plain")
    assert not (plain / "generation_config.json").exists()
    assert json.loads((plain / "config.json").read_text())["bos_token_id"] is None
