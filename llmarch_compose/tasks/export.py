"""`task=export`: the model as an AOTInductor package (`.pt2`) that runs without its code.

The model is built from the config (random weights, seeded) or loaded from one of
our checkpoints (`task.checkpoint=<folder>`), in `precision`'s dtype on `device`.
It is traced with a dynamic batch size and sequence length, compiled, and the
package is checked before it is moved into place: on a fresh input of another
shape than the example it must reproduce the eager model's logits. An existing file is kept
unless `task.overwrite=true`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from ..model.build import DEVICE_CHOICES, build, resolve_device
from ..artifacts.checkpoint import load_checkpoint
from ..errors import ConfigError
from ..artifacts.export import MIN_EXAMPLE_LEN, MIN_SEQ_LEN, export_package, input_names
from ..model.precision import PrecisionConfig
from ..config.spec import resolve_spec
from ..config.structured import to_dataclass
from ..plugin.registry import register

SUFFIX = ".pt2"
PROGRAM_SUFFIX = ".program.pt2"


@dataclass
class ExportTask:
    name: str = "export"
    output: Optional[str] = None  # the package to write: <output>.pt2 (".pt2" added when missing)
    checkpoint: Optional[str] = None  # one of our checkpoint folders; None: build from the config
    save_program: bool = False  # also write the ExportedProgram (torch.export.save) as <output>.program.pt2
    overwrite: bool = False  # replace existing files
    example_seq_len: int = 16  # the traced example's length (its batch is EXAMPLE_BATCH)
    check_seq_len: Optional[int] = None  # the check input's length; None: another length than the example
    max_seq_len: Optional[int] = None  # the longest input the package takes; None: model.max_seq_len
    atol: Optional[float] = None  # allowed |package - eager| on the logits; None: a bound from the dtype


#: The batch sizes of the traced example and of the check input: both dynamic, and different.
EXAMPLE_BATCH, CHECK_BATCH = 2, 3


def output_paths(task: ExportTask) -> tuple[Path, Optional[Path]]:
    """The package and, when asked, the program file; existing ones are refused
    unless task.overwrite."""
    if not task.output:
        raise ConfigError("task.output", task.output, "name the package to write", "a path such as model.pt2")
    stem = task.output[: -len(SUFFIX)] if task.output.endswith(SUFFIX) else task.output
    package = Path(stem + SUFFIX)
    program = Path(stem + PROGRAM_SUFFIX) if task.save_program else None
    for path in (package, program):
        if path is not None and path.exists() and not task.overwrite:
            raise ConfigError("task.overwrite", task.overwrite, f"{path} exists and would be replaced",
                              "task.overwrite=true to replace it, or another task.output")
    return package, program


def sequence_lengths(task: ExportTask, model_max: int) -> tuple[int, int, int]:
    """(example, check, longest) lengths, checked against each other and the model."""
    longest = task.max_seq_len if task.max_seq_len is not None else model_max
    if not MIN_EXAMPLE_LEN <= longest <= model_max:
        raise ConfigError("task.max_seq_len", task.max_seq_len, f"must lie in {MIN_EXAMPLE_LEN}..{model_max}",
                          f"{MIN_EXAMPLE_LEN}..{model_max} (model.max_seq_len), or null")
    if not MIN_EXAMPLE_LEN <= task.example_seq_len <= longest:
        raise ConfigError("task.example_seq_len", task.example_seq_len, "outside the traceable range",
                          f"{MIN_EXAMPLE_LEN}..{longest}")
    check = task.check_seq_len
    if check is None:  # another length, so the check exercises the dynamic dimension
        check = task.example_seq_len * 2 + 1 if task.example_seq_len * 2 + 1 <= longest else task.example_seq_len - 1
    if not MIN_SEQ_LEN <= check <= longest or check == task.example_seq_len:
        raise ConfigError("task.check_seq_len", check, "must differ from task.example_seq_len and lie in the "
                          "dynamic length's range", f"{MIN_SEQ_LEN}..{longest} except {task.example_seq_len}")
    return task.example_seq_len, check, longest


@register("task", "export", params=ExportTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(ExportTask, cfg.task, "task")
    precision = to_dataclass(PrecisionConfig, cfg.precision, "precision")
    precision.validate()
    if precision.autocast_dtype is not None:
        raise ConfigError("precision", precision.name, "autocast is a training setting; a package holds "
                          "weights in one dtype", ["fp32", "bf16"])
    package, program = output_paths(task)
    device = resolve_device(cfg.device)
    if device.type == "meta":
        raise ConfigError("device", cfg.device, "an export needs real weights",
                          [c for c in DEVICE_CHOICES if c != "meta"])
    if task.checkpoint:  # its weights fix the architecture; the numbers are checked after loading
        model_cfg, model = load_checkpoint(task.checkpoint, device=str(device))
        model = model.to(precision.dtype)
        spec = resolve_spec(model_cfg)
        lengths = sequence_lengths(task, spec.model.max_seq_len)
    else:  # everything is checked before a tensor is allocated
        spec = resolve_spec(cfg)
        lengths = sequence_lengths(task, spec.model.max_seq_len)
        torch.manual_seed(cfg.seed)
        model = build(spec, device=device, dtype=precision.dtype)
    example_len, check_len, longest = lengths
    two_inputs = len(input_names(model)) == 2
    ids = torch.Generator(device=device).manual_seed(cfg.seed)

    def token_ids(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, spec.model.vocab_size, (batch, length), device=device, generator=ids)

    # An encoder-decoder's target is shorter than its source, so the two lengths vary apart.
    result = export_package(
        model, package, token_ids(EXAMPLE_BATCH, example_len), max_seq_len=longest,
        example_decoder_input_ids=token_ids(EXAMPLE_BATCH, max(MIN_EXAMPLE_LEN, example_len // 2))
        if two_inputs else None,
        program_path=program, check_input_ids=token_ids(CHECK_BATCH, check_len),
        check_decoder_input_ids=token_ids(CHECK_BATCH, check_len // 2 + 1) if two_inputs else None,
        atol=task.atol, overwrite=task.overwrite)
    print(f"wrote {result.package}" + (f" and {result.program}" if result.program else ""))
    print(f"max abs difference package vs eager logits: {result.max_abs_diff:.3g} "
          f"(checked at [{CHECK_BATCH}, {check_len}], traced at [{EXAMPLE_BATCH}, {example_len}], "
          f"{precision.param_dtype} on {device})")
    return {"package": str(result.package), "program": str(result.program) if result.program else None,
            "max_abs_diff": result.max_abs_diff, "check_shape": [CHECK_BATCH, check_len],
            "example_shape": [EXAMPLE_BATCH, example_len], "max_seq_len": longest,
            "dtype": precision.param_dtype, "device": str(device), "model": spec.model.name}


__all__ = ["ExportTask", "run"]
