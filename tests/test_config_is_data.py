"""A config is data: it names no import path that runs, loads no code, and every key it
sets is used or the run refuses. Hostile files are built here, in temporary folders."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

import llmarch_compose as lc
from llmarch_compose.config.compose import check
from llmarch_compose.errors import ConfigError

B = ["model.d_model=32", "model.n_layers=1", "task.steps=2", "task.batch_size=2", "task.seq_len=16",
     "compile=eager", "task.progress=false"]


def llmarch(args, cwd: Path, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llmarch_compose", *args, f"hydra.run.dir={cwd / 'out'}"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


@pytest.fixture
def victim(tmp_path):
    path = tmp_path / "victim"
    path.write_text("precious")
    return path


def assert_refused(proc, key, victim):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"llmarch: error: {key}="), proc.stderr
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ 1. no import path runs

@pytest.mark.slow  # starts the command line
def test_callback_target_from_the_command_line_is_refused(tmp_path, victim):
    proc = llmarch([*B, "+hydra.callbacks.x={_target_:builtins.open,_args_:[victim,w]}"], tmp_path)
    assert_refused(proc, "hydra.callbacks.x._target_", victim)
    assert "builtins.open" in proc.stderr


@pytest.mark.slow  # starts the command line
def test_torch_load_callback_from_a_config_dir_file_is_refused(tmp_path, victim):
    folder = tmp_path / "confs"
    folder.mkdir()
    (folder / "evil.yaml").write_text("defaults:\n  - config\n  - _self_\nhydra:\n  callbacks:\n    x:\n"
                                      "      _target_: torch.load\n      f: victim\n      weights_only: false\n")
    proc = llmarch(["--config-dir", str(folder), "--config-name", "evil", *B], tmp_path)
    assert_refused(proc, "hydra.callbacks.x._target_", victim)


@pytest.mark.slow
def test_launcher_and_sweeper_targets_must_be_hydra_plugins(tmp_path, victim):
    proc = llmarch([*B, "hydra.launcher._target_=builtins.open"], tmp_path)
    assert_refused(proc, "hydra.launcher._target_", victim)
    proc = llmarch([*B, "hydra/sweeper=optuna", "hydra.sweeper.sampler._target_=builtins.exec"], tmp_path)
    assert_refused(proc, "hydra.sweeper.sampler._target_", victim)


def test_a_target_outside_the_hydra_node_is_refused():
    with pytest.raises(ConfigError, match=r"task\.x\._target_='os\.system'"):
        lc.compose(["+task.x={_target_:os.system}"])


@pytest.mark.parametrize("override, key", [
    ("hydra.job_logging.handlers.console.class=subprocess.Popen", "hydra.job_logging.handlers.console.class"),
    ("+hydra.hydra_logging.formatters.x={class:builtins.eval}", "hydra.hydra_logging.formatters.x.class"),
    ("hydra.job_logging.handlers.console.class=logging.Formatter", "hydra.job_logging.handlers.console.class"),
    ("hydra.job_logging.handlers.console.stream=ext://os.system", "hydra.job_logging.handlers.console.stream"),
    ("hydra.job_logging.handlers.file.filename=/tmp/victim", "hydra.job_logging.handlers.file.filename"),
    ("hydra.job_logging.handlers.file.filename=${hydra.runtime.output_dir}/../victim",
     "hydra.job_logging.handlers.file.filename"),
    ("hydra.job.name=../victim", "hydra.job.name"),
])
def test_a_logging_config_may_name_only_logging_classes_and_files_in_the_run(override, key):
    with pytest.raises(ConfigError) as info:
        check([override])
    assert info.value.key == key


def test_logging_inside_the_run_folder_passes():
    check(["hydra.job_logging.handlers.file.filename=logs/train.log", "hydra.job_logging.root.level=DEBUG",
           "hydra.job_logging.handlers.console.stream=ext://sys.stderr"])
    for job, hydra_logging in (("default", "default"), ("disabled", "disabled"), ("none", "none"),
                               ("stdout", "hydra_debug")):  # every logging config Hydra ships
        check([f"hydra/job_logging={job}", f"hydra/hydra_logging={hydra_logging}"])


@pytest.mark.slow  # starts the command line
def test_a_log_handler_cannot_truncate_a_file_outside_the_run(tmp_path, victim):
    proc = llmarch([*B, f"+hydra.job_logging.handlers.x={{class:logging.FileHandler,filename:{victim},mode:w}}"],
                   tmp_path)
    assert_refused(proc, "hydra.job_logging.handlers.x.filename", victim)


@pytest.mark.slow
def test_registered_and_hydra_callbacks_are_accepted(tmp_path):
    proc = llmarch([*B, "+hydra.callbacks.log={_target_:hydra.experimental.callbacks.LogJobReturnCallback}"],
                   tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "held-out loss" in proc.stdout


# ------------------------------------------------------------------ 2. tokenizers and checkpoint folders run no code

@pytest.mark.slow
def test_tokenizer_folder_with_auto_map_is_refused_without_a_prompt(tmp_path, victim):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text('{"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", null]}}')
    (tok / "evil.py").write_text(f"open({str(victim)!r}, 'w')\n")
    (tmp_path / "notes.txt").write_text("some text to train on " * 200)
    proc = llmarch([*B, "data=text", f"data.path={tmp_path / 'notes.txt'}", f"data.tokenizer={tok}"], tmp_path)
    assert_refused(proc, "data.tokenizer", victim)
    assert "tokenizer_config.json has auto_map" in proc.stderr


def test_auto_map_in_config_json_is_refused(tmp_path):
    from llmarch_compose.train.data import load_tokenizer

    (tmp_path / "config.json").write_text('{"auto_map": {"AutoConfig": "x.Y"}}')
    with pytest.raises(ConfigError, match=r"data\.tokenizer=.*config\.json has auto_map"):
        load_tokenizer(str(tmp_path))


def test_billion_laughs_checkpoint_config_fails_fast(tmp_path):
    import time

    from llmarch_compose.artifacts.checkpoint import load_checkpoint

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    (tmp_path / "config.yaml").write_text("\n".join(lines) + "\nmodel: {name: x}\n")
    start = time.perf_counter()
    with pytest.raises(lc.LlmarchError, match="config.yaml: YAML anchors and aliases"):
        load_checkpoint(tmp_path)
    assert time.perf_counter() - start < 0.5


def test_oversized_checkpoint_config_is_refused(tmp_path):
    from llmarch_compose.artifacts.checkpoint import load_checkpoint

    (tmp_path / "config.yaml").write_text("model: {name: x}\n" + "# pad\n" * (1 << 20))
    with pytest.raises(lc.LlmarchError, match="config.yaml: larger than 4 MiB"):
        load_checkpoint(tmp_path)


def test_non_json_hf_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("model_type: llama\n")
    with pytest.raises(lc.LlmarchError, match=r"config\.json: not valid JSON"):
        lc.compose(["model=hf", f"model.path={tmp_path}"])


def test_oversized_hf_config_is_refused(tmp_path):
    from llmarch_compose.interop.hf import read_config

    (tmp_path / "config.json").write_text('{"model_type": "llama", "pad": "' + "x" * (17 << 20) + '"}')
    with pytest.raises(lc.LlmarchError, match=r"config\.json: larger than 16 MiB"):
        read_config(tmp_path)


@pytest.mark.parametrize("kind", ["truncated", "pickle"])
def test_bad_safetensors_names_the_file(tmp_path, kind, victim):
    import torch
    from safetensors.torch import save_file

    from llmarch_compose.interop.hf import read_tensors

    file = tmp_path / "model.safetensors"
    if kind == "truncated":
        save_file({"w": torch.zeros(64, 64)}, str(file))
        file.write_bytes(file.read_bytes()[:-100])
    else:  # a pickle that would write to the victim when unpickled
        class Evil:
            def __reduce__(self):
                return (open, (str(victim), "w"))

        import pickle

        file.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(lc.LlmarchError, match=r"model\.safetensors: not a readable safetensors file"):
        read_tensors(tmp_path)
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ 3. every key set is used

from hydra import initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from llmarch_compose.config.compose import CONFIG_MODULE, VERSION_BASE  # noqa: E402
from llmarch_compose.config.spec import resolve_spec  # noqa: E402
from llmarch_compose.config.usage import check_used  # noqa: E402
from llmarch_compose.tasks.summary import render_text  # noqa: E402


def refused_key(overrides):
    cfg = lc.compose(overrides)
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=VERSION_BASE):
        with pytest.raises(ConfigError) as info:
            check_used(cfg, overrides, GlobalHydra.instance().config_loader())
    GlobalHydra.instance().clear()
    return str(info.value)


@pytest.mark.parametrize("overrides, message", [
    (["model.window=4096"], "model.window=4096: attention=gqa has no window; use attention=swa or "
                            "attention.window=4096"),
    (["attention=mha", "model.window=4096"], "attention=mha has no window; use attention=swa"),
    (["attention=mla", "model.window=4096"], "attention=mla has no window; use attention=swa"),
    (["ffn=moe", "model.mlp_bias=true"], "model.mlp_bias=True: ffn=moe has no mlp_bias; use ffn=dense"),
    (["attention=mla", "model.qk_norm=true"], "attention=mla has no qk_norm; use attention=gqa"),
    (["attention=mla", "model.qkv_bias=true"], "attention=mla has no qkv_bias; use attention=gqa"),
])
def test_a_model_key_no_chosen_plugin_reads_is_refused(overrides, message):
    assert message in refused_key(overrides)


@pytest.mark.slow
def test_the_command_line_refuses_a_number_nothing_reads(tmp_path):
    victim = tmp_path / "unused"
    victim.write_text("precious")
    proc = llmarch(["model.window=4096", "task=summary"], tmp_path)
    assert_refused(proc, "model.window", victim)
    assert "attention=gqa has no window; use attention=swa or attention.window=4096" in proc.stderr
    assert llmarch(["attention=swa", "model.window=64", "task=summary"], tmp_path).returncode == 0


def test_compose_strict_refuses_from_python_what_the_command_line_refuses():
    with pytest.raises(ConfigError, match="attention=gqa has no window"):
        lc.compose(["model.window=4096"], strict=True)
    assert lc.compose(["model.window=4096"]).model.window == 4096  # not strict: listed unused on the card
    # What describes a checkpoint is exempt: a Hugging Face config's sliding_window under gqa is no typo.
    assert lc.compose(["model.d_model=64"], strict=True, described=["model.window=4096"]).model.window == 4096


def test_keys_a_chosen_plugin_reads_pass():
    for overrides in (["attention=swa", "model.window=8"], ["ffn=moe", "model.ffn_dim=64"],
                      ["model.qkv_bias=true"], ["model.d_model=64"]):
        check_used(lc.compose(overrides), overrides)


def test_a_preset_number_no_plugin_reads_is_listed_unused():
    spec = resolve_spec(lc.compose([]))  # tiny sets window: 64 and chooses attention=gqa
    assert spec.unused == ("window",)
    assert resolve_spec(lc.compose(["attention=swa"])).unused == ()
    card = {"model": "tiny", "components": spec.components, "plugins": spec.components,
            "dimensions": {}, "unused": list(spec.unused)}
    assert "unused          window" in render_text({**card, **_counts()})


def _counts():
    return {k: 0 for k in ("params_total", "params_embedding", "params_non_embedding", "params_active",
                           "flops_matmul", "flops_attention", "flops_per_token", "kv_cache_bytes_per_token",
                           "kv_cache_bytes_full_context", "inference_weight_bytes")} | {
        "context": 1, "kv_cache_dtype": "bfloat16",
        "training_memory_fp32_adamw_bytes": {"total": 0, "weights": 0, "gradients": 0, "adamw_states": 0}}


@pytest.mark.parametrize("rule", ["{layers:[40],ffn:moe}", "{start:40,ffn:moe}", "{stack:encoder,ffn:moe}"])
def test_a_layer_rule_that_selects_no_layer_is_refused(rule):
    with pytest.raises(ConfigError, match=r"model\.layer_pattern\[0\]=.*selects no layer of 32"):
        resolve_spec(lc.compose(["model=llama2_7b", f"model.layer_pattern=[{rule}]"]))


def test_a_window_longer_than_the_context_is_refused():
    with pytest.raises(ConfigError, match=r"model\.window=100000: longer than model\.max_seq_len=256"):
        resolve_spec(lc.compose(["attention=swa", "model.window=100000"]))


@pytest.mark.parametrize("node", ["model", "attention", "task", "data"])
def test_deleting_a_node_every_run_needs_is_refused(node):
    with pytest.raises(ConfigError, match=rf"^{node}='~{node}': every run needs this node"):
        lc.compose([f"~{node}"])


@pytest.mark.parametrize("override, key", [("model.init_std=-1", "model.init_std"),
                                           ("model.norm_eps=nan", "model.norm_eps"),
                                           ("model.rope_theta=inf", "model.rope_theta"),
                                           ("model.router_aux_loss_coef=-0.5", "model.router_aux_loss_coef")])
def test_negative_or_non_finite_numbers_are_refused(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}="):
        resolve_spec(lc.compose([override]))


# ------------------------------------------------------------------ 4. errors, not tracebacks

@pytest.mark.slow
@pytest.mark.parametrize("args, key", [
    (["task.output={tmp}/afile"], "task.output"),
    (["data=text", "data.path={tmp}/empty.txt"], "data.path"),
    (["data=text", "data.path={tmp}", "data.glob="], "data.glob"),
    (["=5"], "overrides"),
    (["task.lr=${{model.nonexistent}}"], "task.lr"),
    (["model.d_model=${{model.d_model}}"], "model.d_model"),
])
def test_bad_input_is_one_line_naming_the_key(tmp_path, args, key):
    (tmp_path / "afile").write_text("not a folder")
    (tmp_path / "empty.txt").write_text("")
    victim = tmp_path / "afile"
    proc = llmarch([*B, *(a.format(tmp=tmp_path) for a in args)], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.startswith(f"llmarch: error: {key}="), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert victim.read_text() == "not a folder"


@pytest.mark.parametrize("key, folder, multirun", [
    ("hydra.run.dir", "/proc/llmarch-run", False),
    ("hydra.run.dir", "{tmp}/afile/run", False),
    ("hydra.sweep.dir", "/proc/llmarch-sweep", True),
])
def test_a_run_folder_that_cannot_be_created_is_refused_before_hydra(tmp_path, key, folder, multirun):
    (tmp_path / "afile").write_text("not a folder")
    with pytest.raises(ConfigError) as info:
        check(["task=summary", f"{key}={folder.format(tmp=tmp_path)}"], multirun=multirun)
    assert info.value.key == key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # the probe left nothing


def test_a_creatable_run_folder_passes_and_is_not_created_by_the_check(tmp_path):
    check(["task=summary", f"hydra.run.dir={tmp_path}/new/run"])
    assert list(tmp_path.iterdir()) == []


def test_an_internal_error_keeps_its_traceback_and_asks_to_report(tmp_path, monkeypatch):
    """A bug (here a task that raises) is not dressed up as bad input."""
    from llmarch_compose import cli
    from llmarch_compose.plugin import registry as plugins_registry

    def broken(cfg):
        raise RuntimeError("a bug")

    info = plugins_registry.get("task", "summary")
    monkeypatch.setitem(plugins_registry._registry["task"], "summary", dataclasses.replace(info, target=broken))
    with pytest.raises(SystemExit) as exited:
        cli.main(["task=summary", f"hydra.run.dir={tmp_path}/run"])
    assert exited.value.code == cli.EXIT_INTERNAL
