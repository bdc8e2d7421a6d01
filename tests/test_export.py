"""Export: torch.export with a dynamic batch and sequence length, AOTInductor packages
that run without the project's code, `task=export`, and the `device` key.

AOTInductor compiles C++, so the package is built once for the module (by the
`llmarch task=export` command, from a checkpoint) and every test reuses it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import llmarch_compose as lc
from llmarch_compose.model.build import resolve_device
from llmarch_compose.artifacts.checkpoint import save_checkpoint
from llmarch_compose.errors import ConfigError
from llmarch_compose.artifacts.export import ExportMismatchError, check_package, export_package, input_names
from llmarch_compose.config.spec import resolve_spec
from llmarch_compose.tasks import export as export_task

LLAMA = ["model=llama3_8b", "scale=tiny"]


def llmarch(args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "llmarch_compose", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def vocab(cfg) -> int:
    return resolve_spec(cfg).model.vocab_size


def random_ids(cfg, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab(cfg), (batch, length), generator=torch.Generator().manual_seed(seed + length))


def eager_logits(model, *ids):
    with torch.no_grad():
        return model.eval()(*ids).logits


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny LLaMA-3 saved as a checkpoint and exported from it by the command line."""
    root = tmp_path_factory.mktemp("export")
    cfg = lc.compose(LLAMA)
    torch.manual_seed(1)
    model = lc.build(cfg).eval()
    save_checkpoint(model, cfg, root / "checkpoint")
    proc = llmarch(["task=export", f"task.checkpoint={root / 'checkpoint'}", f"task.output={root / 'llama'}",
                    "task.save_program=true", "task.example_seq_len=16", "device=cpu"], tmp_path_factory.mktemp("cwd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"root": root, "cfg": cfg, "model": model, "proc": proc,
            "package": root / "llama.pt2", "program": root / "llama.program.pt2"}


@pytest.mark.slow
def test_task_writes_a_package_it_checked(exported):
    root, proc = exported["root"], exported["proc"]
    assert exported["package"].is_file() and exported["program"].is_file()
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint", "llama.program.pt2", "llama.pt2"]  # no temp
    line = next(line for line in proc.stdout.splitlines() if line.startswith("max abs difference"))
    diff = float(line.split(":")[1].split()[0])
    assert 0 <= diff < 1e-4, line
    assert "checked at [3, 33], traced at [2, 16]" in line  # the check ran at another shape


@pytest.mark.slow
def test_package_matches_eager_at_several_shapes(exported):
    model, compiled = exported["model"], lc.load_compiled(exported["package"])
    # 128: the tiny scale's max_seq_len, the dynamic length's bound; the batch is dynamic too.
    for batch, length in ((1, 1), (1, 7), (2, 16), (4, 50), (1, 128)):
        ids = random_ids(exported["cfg"], batch, length)
        out = compiled(ids)
        assert out.aux_loss is None and out.logits.shape == (batch, length, vocab(exported["cfg"]))
        torch.testing.assert_close(out.logits, eager_logits(model, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_loaded_package_refuses_inputs_it_was_not_compiled_for(exported):
    # The compiled code does not check its inputs (a wrong shape is silently misread); load_compiled does.
    compiled = lc.load_compiled(exported["package"])
    assert [(s.name, s.min_len, s.max_len, s.max_batch) for s in compiled.inputs] == [("input_ids", 1, 128, None)]
    for bad in (torch.zeros(1, 129, dtype=torch.long), torch.zeros(1, 8, dtype=torch.int32),
                torch.zeros(8, dtype=torch.long)):
        with pytest.raises(ValueError, match="input_ids of shape"):
            compiled(bad)
    with pytest.raises(ValueError, match="takes 1 input"):
        compiled(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))


@pytest.mark.slow
def test_package_runs_without_the_project_code(exported, tmp_path):
    ids = random_ids(exported["cfg"], 2, 41)
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["llmarch_compose"] = None  # any import of the project would now fail
        import torch
        run = torch._inductor.aoti_load_package({str(exported["package"])!r})
        out = run(torch.load({str(tmp_path / "ids.pt")!r}))
        assert isinstance(out, (tuple, list)) and len(out) == 1, type(out)
        torch.save(out[0], {str(tmp_path / "logits.pt")!r})
        print(sorted(m for m in sys.modules if m.startswith("llmarch")))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "['llmarch_compose']"  # only the blocking placeholder
    logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(logits, eager_logits(exported["model"], ids), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_saved_program_loads_and_matches(exported):
    program = torch.export.load(exported["program"])
    ids = random_ids(exported["cfg"], 3, 23)
    (logits,) = program.module()(ids)
    torch.testing.assert_close(logits, eager_logits(exported["model"], ids), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_the_check_fails_for_other_weights(exported):
    torch.manual_seed(2)
    other = lc.build(exported["cfg"])
    ids = random_ids(exported["cfg"], 1, 9)
    assert check_package(exported["model"], exported["package"], ids) < 1e-4
    with pytest.raises(ExportMismatchError, match="differ from the eager model's"):
        check_package(other, exported["package"], ids)


@pytest.mark.slow
def test_existing_output_is_refused(exported):
    package = exported["package"]
    before = package.read_bytes()
    cfg = lc.compose([*LLAMA, "task=export", f"task.output={package}"])
    with pytest.raises(ConfigError) as err:
        export_task.run(cfg)
    assert err.value.key == "task.overwrite" and str(package) in str(err.value)
    assert package.read_bytes() == before


@pytest.mark.slow
def test_failed_compile_leaves_the_old_file(tmp_path, monkeypatch):
    package = tmp_path / "model.pt2"
    package.write_bytes(b"the earlier package")

    def fail_midway(program, package_path, inductor_configs=None):
        Path(package_path).write_bytes(b"half a package")
        raise RuntimeError("compiler crashed")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", fail_midway)
    model = lc.build(lc.compose(LLAMA))
    with pytest.raises(RuntimeError, match="compiler crashed"):
        export_package(model, package, random_ids(lc.compose(LLAMA), 2, 8), overwrite=True)
    assert package.read_bytes() == b"the earlier package"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


@pytest.mark.slow
def test_encoder_decoder_exports_with_two_dynamic_lengths():
    cfg = lc.compose(["model=t5_small", "scale=tiny"])
    torch.manual_seed(0)
    model = lc.build(cfg).eval()
    assert input_names(model) == ("input_ids", "decoder_input_ids")
    program = lc.export_program(model, random_ids(cfg, 2, 12), max_seq_len=128,
                                example_decoder_input_ids=random_ids(cfg, 2, 5))
    assert len(program.range_constraints) == 3  # the batch, and source and target lengths that vary apart
    for batch, source, target in ((1, 3, 17), (3, 40, 2)):
        src, tgt = random_ids(cfg, batch, source), random_ids(cfg, batch, target, seed=1)
        (logits,) = program.module()(src, tgt)
        torch.testing.assert_close(logits, eager_logits(model, src, tgt), rtol=1e-5, atol=1e-5)


def test_inputs_come_from_the_objective_and_other_modules_are_refused():
    class Denoising(lc.Objective):
        name, input_names = "denoising", ("input_ids", "noise_ids")

    class Denoiser(lc.Topology):
        objective = Denoising()

    assert input_names(Denoiser()) == ("input_ids", "noise_ids")
    with pytest.raises(ConfigError) as err:
        input_names(torch.nn.Linear(2, 2))
    assert err.value.key == "model" and err.value.value == "Linear" and "Topology" in str(err.value)


@pytest.mark.parametrize("value", ["gpu", "cuda:x", "cpu:0", "tpu"])
def test_unknown_device_names_the_key(value):
    with pytest.raises(ConfigError) as err:
        resolve_device(value)
    assert err.value.key == "device" and err.value.value == value
    assert "auto, cpu, cuda, cuda:<index>" in str(err.value)


def test_cuda_without_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(None) == torch.device("cpu")
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match=rf"device='{value}': CUDA is not available") as err:
            resolve_device(value)
        assert err.value.key == "device"


def test_cuda_index_is_checked_against_the_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="cuda:0, cuda:1") as err:
        resolve_device("cuda:2")
    assert err.value.key == "device"


@pytest.mark.slow
def test_bad_device_on_the_command_line(tmp_path):
    proc = llmarch([*LLAMA, "task=export", f"task.output={tmp_path / 'm'}", "device=gpu"], tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "device='gpu'" in proc.stderr and "Valid: auto, cpu, cuda" in proc.stderr, proc.stderr
    assert not (tmp_path / "m.pt2").exists()


@pytest.mark.slow
def test_export_task_options_are_checked():
    for override, key in (("task.check_seq_len=16", "task.check_seq_len"),
                          ("task.example_seq_len=1", "task.example_seq_len"),
                          ("task.max_seq_len=4096", "task.max_seq_len"),
                          ("precision=mixed", "precision"), ("device=meta", "device")):
        cfg = lc.compose([*LLAMA, "task=export", "task.output=unused", override])
        with pytest.raises(ConfigError) as err:
            export_task.run(cfg)
        assert err.value.key == key, (override, err.value)
    with pytest.raises(ConfigError) as err:
        export_task.run(lc.compose([*LLAMA, "task=export"]))
    assert err.value.key == "task.output"


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["mistral_7b", "mixtral_8x7b"])
def test_program_matches_eager_at_other_shapes(preset):
    # Mistral's sliding window needs a mask, which must not fix the traced length;
    # Mixtral's experts report an auxiliary loss, a second output.
    cfg = lc.compose([f"model={preset}", "scale=tiny"])
    torch.manual_seed(0)
    model = lc.build(cfg).eval()
    program = lc.export_program(model, random_ids(cfg, 2, 12))
    for batch, length in ((1, 5), (3, 64)):  # 64: beyond the tiny window of 32
        ids = random_ids(cfg, batch, length)
        outputs = program.module()(ids)
        with torch.no_grad():
            expected = model(ids)
        torch.testing.assert_close(outputs[0], expected.logits, rtol=1e-5, atol=1e-5)
        if preset == "mixtral_8x7b":
            torch.testing.assert_close(outputs[1], expected.aux_loss, rtol=1e-5, atol=1e-6)
        else:
            assert len(outputs) == 1 and expected.aux_loss is None
