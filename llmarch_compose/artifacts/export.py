"""Export: a model as a `torch.export` program and an AOTInductor package (`.pt2`).

The package runs without the model's Python code: `torch._inductor.aoti_load_package`
alone loads it. Its inputs are token ids (`input_ids`, plus `decoder_input_ids`
for an encoder-decoder) whose batch size and sequence length are dynamic; its
outputs are plain tensors, `(logits,)` or `(logits, aux_loss)` for a model with
auxiliary losses, since a NamedTuple output would need its class to be
importable where the package is loaded. `load_compiled` turns them back into a
`ModelOutput`, and checks the inputs against the shapes stored in the package's
metadata: the compiled code itself does not, and silently misreads others.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..plugin.interfaces import ModelOutput, Topology
from ..errors import ConfigError, LlmarchError
from ..plugin.registry import discover
from .atomic import atomic_path

PathLike = Union[str, "os.PathLike[str]"]

#: The shortest sequence and the smallest batch a package accepts.
MIN_SEQ_LEN = MIN_BATCH = 1
#: The smallest example size along a dynamic dimension: torch.export specializes 0 and 1 to constants.
MIN_EXAMPLE_LEN = 2
#: The package metadata key under which the input shapes are stored.
METADATA_KEY = "llmarch_compose.inputs"


class LogitsOnly(nn.Module):
    """The model with plain tensor outputs: `(logits,)`, or `(logits, aux_loss)`
    when the model reports an auxiliary loss."""

    def __init__(self, model: nn.Module, with_aux_loss: bool):
        super().__init__()
        self.model = model
        self.with_aux_loss = with_aux_loss

    def forward(self, input_ids: torch.Tensor,
                decoder_input_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
        out = self.model(input_ids) if decoder_input_ids is None else self.model(input_ids, decoder_input_ids)
        return (out.logits, out.aux_loss) if self.with_aux_loss else (out.logits,)


@dataclass(frozen=True)
class InputSpec:
    """The shapes one input of a package accepts: (batch, seq) token ids."""

    name: str
    min_batch: int
    max_batch: Optional[int]  # None: unbounded
    min_len: int
    max_len: Optional[int]  # None: unbounded

    def check(self, ids: torch.Tensor, where: str) -> None:
        batch_ok = ids.dim() == 2 and self.min_batch <= ids.shape[0] <= (self.max_batch or ids.shape[0])
        len_ok = ids.dim() == 2 and self.min_len <= ids.shape[1] <= (self.max_len or ids.shape[1])
        if not (batch_ok and len_ok and ids.dtype == torch.long):
            raise ValueError(f"{where}: {self.name} of shape {tuple(ids.shape)} and dtype {ids.dtype}; it takes "
                             f"int64 ids of shape (batch, seq) with batch in {_span(self.min_batch, self.max_batch)} "
                             f"and seq in {_span(self.min_len, self.max_len)}")


def _span(low: int, high: Optional[int]) -> str:
    return str(low) if low == high else f"{low}..{high if high is not None else 'any'}"


def input_names(model: nn.Module) -> tuple[str, ...]:
    """The token-id inputs of `model`'s forward, as its objective declares them; a model that
    is no topology is refused, naming it."""
    if not isinstance(model, Topology):
        raise ConfigError("model", type(model).__name__, "cannot be exported: not a composed model "
                          "(a Topology, whose objective declares its inputs)", "a model from llmarch_compose.build")
    return model.objective.input_names


def model_inputs(model: nn.Module, input_ids: torch.Tensor,
                 decoder_input_ids: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """The positional inputs of `model` for these ids: an encoder-decoder without
    decoder ids reads the source ids again (its autoencoding pass)."""
    if len(input_names(model)) == 1:
        if decoder_input_ids is not None:
            raise ConfigError("topology", type(model).__name__, "takes no decoder_input_ids", ["input_ids alone"])
        return (input_ids,)
    return (input_ids, input_ids.clone() if decoder_input_ids is None else decoder_input_ids)


def input_specs(model: nn.Module, inputs: Sequence[torch.Tensor], dynamic_seq: bool, dynamic_batch: bool,
                max_seq_len: Optional[int]) -> list[InputSpec]:
    """What the exported inputs accept: the example's sizes where a dimension is
    static; from 1 to the bound (`max_seq_len` for lengths) where it is dynamic."""
    specs = []
    for name, ids in zip(input_names(model), inputs):
        if ids.dim() != 2:
            raise ValueError(f"{name} of shape {tuple(ids.shape)}: token ids must be (batch, seq)")
        batch, length = ids.shape
        for dynamic, size, what, high in ((dynamic_batch, batch, "batch", None),
                                          (dynamic_seq, length, "seq", max_seq_len)):
            if dynamic and not MIN_EXAMPLE_LEN <= size <= (high or size):
                raise ValueError(f"{name} of shape {tuple(ids.shape)}: a dynamic {what} size needs an example "
                                 f"of {MIN_EXAMPLE_LEN}..{high or 'any'}")
        specs.append(InputSpec(name, MIN_BATCH if dynamic_batch else batch, None if dynamic_batch else batch,
                               MIN_SEQ_LEN if dynamic_seq else length, max_seq_len if dynamic_seq else length))
    return specs


def _dynamic_shapes(specs: Sequence[InputSpec]) -> dict[str, dict[int, torch.export.Dim]]:
    """One Dim per input's length (an encoder-decoder's source and target lengths
    vary apart), one batch Dim that every input shares."""
    batch = torch.export.Dim("batch", min=MIN_BATCH)
    shapes = {}
    for spec in specs:
        dims = {}
        if spec.max_batch is None:
            dims[0] = batch
        if spec.min_len != spec.max_len:
            bounds = {"min": spec.min_len, **({"max": spec.max_len} if spec.max_len else {})}
            dims[1] = torch.export.Dim(f"{spec.name}_len", **bounds)
        shapes[spec.name] = dims
    return shapes


@contextlib.contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for the duration, the model's mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _export(model: nn.Module, example_input_ids: torch.Tensor, dynamic_seq: bool, dynamic_batch: bool,
            max_seq_len: Optional[int], example_decoder_input_ids: Optional[torch.Tensor]
            ) -> tuple[torch.export.ExportedProgram, list[InputSpec]]:
    inputs = model_inputs(model, example_input_ids, example_decoder_input_ids)  # refuses a non-Topology
    max_seq_len = max_seq_len if max_seq_len is not None else model.max_seq_len
    specs = input_specs(model, inputs, dynamic_seq, dynamic_batch, max_seq_len)
    with _inference(model):
        with_aux_loss = model(*inputs).aux_loss is not None
        program = torch.export.export(LogitsOnly(model, with_aux_loss), inputs, dynamic_shapes=_dynamic_shapes(specs))
    return program, specs


def export_program(model: nn.Module, example_input_ids: torch.Tensor, dynamic_seq: bool = True, *,
                   dynamic_batch: bool = True, max_seq_len: Optional[int] = None,
                   example_decoder_input_ids: Optional[torch.Tensor] = None) -> torch.export.ExportedProgram:
    """`model` traced by `torch.export` in eval mode, outputs as plain tensors.

    With `dynamic_seq`, each input's sequence length is a symbolic size from 1 to
    `max_seq_len` (default: the topology's `max_seq_len`, None: unbounded); an encoder-decoder's source and target lengths vary apart. With
    `dynamic_batch` the batch size is symbolic too. A dynamic dimension needs an
    example size of at least 2."""
    return _export(model, example_input_ids, dynamic_seq, dynamic_batch, max_seq_len, example_decoder_input_ids)[0]


@dataclass
class ExportResult:
    package: Path  # the AOTInductor package
    program: Optional[Path]  # the ExportedProgram (torch.export.save), when asked
    inputs: list[InputSpec]  # the shapes the package accepts
    max_abs_diff: Optional[float]  # package vs eager logits on the check input, when checked


class ExportMismatchError(LlmarchError):
    """The compiled package does not reproduce the eager model's logits."""


def export_package(model: nn.Module, path: PathLike, example_input_ids: torch.Tensor, *,
                   dynamic_seq: bool = True, dynamic_batch: bool = True, max_seq_len: Optional[int] = None,
                   example_decoder_input_ids: Optional[torch.Tensor] = None,
                   program_path: Optional[PathLike] = None,
                   check_input_ids: Optional[torch.Tensor] = None,
                   check_decoder_input_ids: Optional[torch.Tensor] = None, atol: Optional[float] = None,
                   overwrite: bool = False, inductor_configs: Optional[dict] = None) -> ExportResult:
    """Export `model` (see `export_program`), compile it with AOTInductor and write
    the package to `path` (a `.pt2`), and the ExportedProgram to `program_path`
    when given.

    With `check_input_ids` the package runs on them before it is moved into place
    and must match the eager model's logits within `atol` (default: a bound from
    the logits' dtype and size); otherwise ExportMismatchError, and nothing is
    written. Writes are atomic: a failed export leaves earlier files intact."""
    path = Path(path)
    if path.suffix != ".pt2":
        raise ValueError(f"{path}: an AOTInductor package's name must end in .pt2")
    program, specs = _export(model, example_input_ids, dynamic_seq, dynamic_batch, max_seq_len,
                             example_decoder_input_ids)
    configs = dict(inductor_configs or {})
    metadata = dict(configs.get("aot_inductor.metadata", {}))
    metadata[METADATA_KEY] = json.dumps([asdict(spec) for spec in specs])
    configs["aot_inductor.metadata"] = metadata
    with contextlib.ExitStack() as stack:
        package_tmp = stack.enter_context(atomic_path(path, overwrite))
        program_tmp = stack.enter_context(atomic_path(program_path, overwrite)) if program_path else None
        torch._inductor.aoti_compile_and_package(program, package_path=str(package_tmp), inductor_configs=configs)
        if program_tmp is not None:
            torch.export.save(program, program_tmp)
        diff = None
        if check_input_ids is not None:
            diff = check_package(model, package_tmp, check_input_ids, check_decoder_input_ids, atol=atol)
    return ExportResult(path, Path(program_path) if program_path else None, specs, diff)


def check_package(model: nn.Module, package: PathLike, input_ids: torch.Tensor,
                  decoder_input_ids: Optional[torch.Tensor] = None, atol: Optional[float] = None) -> float:
    """The largest absolute difference between the package's and the eager model's
    logits on these ids; ExportMismatchError when it exceeds `atol`."""
    inputs = model_inputs(model, input_ids, decoder_input_ids)
    with _inference(model):
        expected = model(*inputs).logits
    device = input_ids.device  # a CUDA package runs on the device of the ids it is checked with
    got = load_compiled(package, device.index if device.type == "cuda" and device.index is not None else -1)(
        *inputs).logits
    if got.shape != expected.shape:
        raise ExportMismatchError(f"{package}: logits of shape {tuple(got.shape)}, "
                                  f"the model's are {tuple(expected.shape)}")
    diff = (got.float() - expected.float()).abs().max().item()
    bound = atol if atol is not None else default_atol(expected)
    if not diff <= bound:  # also catches NaN
        raise ExportMismatchError(f"{package}: logits differ from the eager model's by {diff:.3g} "
                                  f"(allowed {bound:.3g}) on inputs of shape "
                                  f"{', '.join(str(tuple(i.shape)) for i in inputs)}")
    return diff


def default_atol(expected: torch.Tensor) -> float:
    """A tolerance for compiled vs eager logits: kernels may sum in another order,
    so the bound grows with the dtype's resolution and the logits' magnitude."""
    scale = max(1.0, expected.float().abs().max().item())
    return 64 * torch.finfo(expected.dtype).eps * scale


class CompiledModel:
    """An AOTInductor package loaded for inference: called with token ids like the
    model, it returns a ModelOutput."""

    def __init__(self, path: PathLike, device_index: int = -1):
        self.path = Path(path)
        self._package = torch._inductor.aoti_load_package(str(path), device_index=device_index)
        stored = self._package.get_metadata().get(METADATA_KEY)
        #: The shapes the package accepts; None for a package written elsewhere (inputs then go unchecked).
        self.inputs = [InputSpec(**spec) for spec in json.loads(stored)] if stored else None

    def __call__(self, *token_ids: torch.Tensor) -> ModelOutput:
        if self.inputs is not None:
            if len(token_ids) != len(self.inputs):
                raise ValueError(f"{self.path} takes {len(self.inputs)} input(s) "
                                 f"({', '.join(s.name for s in self.inputs)}), got {len(token_ids)}")
            for spec, ids in zip(self.inputs, token_ids):
                spec.check(ids, str(self.path))
        outputs = self._package(*token_ids)
        return ModelOutput(outputs[0], outputs[1] if len(outputs) > 1 else None)

    def __repr__(self) -> str:
        return f"CompiledModel({str(self.path)!r})"


def load_compiled(path: PathLike, device_index: int = -1) -> CompiledModel:
    """Load a package written by `export_package` (no model code is needed: plain
    `torch._inductor.aoti_load_package(path)` runs it too, returning the tuple)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no AOTInductor package at {path}")
    # A package may call the plugins' custom ops (the fp32 grouped expert products
    # of MoE layers) through the Python dispatcher: they must be registered first.
    discover()
    return CompiledModel(path, device_index)


__all__ = ["export_program", "export_package", "load_compiled", "check_package", "CompiledModel", "InputSpec",
           "ExportResult", "ExportMismatchError", "LogitsOnly"]
