"""Grouped matrix products: rows [n, k] cut into consecutive groups, group g
multiplied by weights[g] [k, m]; the mechanism behind the mixture of experts'
dispatch.

`offsets` [groups] (int32) holds each group's end row, cumulatively; rows past
the last end belong to no group and give zero rows.

Two kernels, chosen by dtype so that eager and compiled runs take the same one:

- bf16: `torch._grouped_mm`, a fused grouped kernel on recent GPUs, with its own
  backward and an Inductor lowering. Rows past the last end come back undefined,
  so callers that leave such rows (capacity drops) mask them.
- any other dtype: the custom op `llmarch::grouped_mm`, a loop of one `mm` per
  group written straight into the output. In torch 2.13 `_grouped_mm` runs fp32
  eagerly on the CPU but its fake (compile-time) rule accepts bf16 only, and it
  refuses float64; the custom op is opaque to the compiler (a registered fake
  gives its shape), so a model compiles with fullgraph=True and the matrix
  products run at the rate of plain `mm` on large contiguous row blocks. The
  group sizes, data-dependent, are read inside the op: no unbacked sizes reach
  the graph. Its backward is two more such ops (rows' gradient: the same grouped
  product with each weight transposed; weights' gradient: one rows^T @ grad per
  group).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: dtypes that `torch._grouped_mm` takes both eagerly and under torch.compile.
FUSED_DTYPES = (torch.bfloat16,)


def grouped_mm(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    """rows [n, k] @ weights [groups, k, m] group by group -> [n, m]. Under autocast both
    operands take its dtype, as `torch.mm` would (a custom op is not cast by autocast)."""
    device = rows.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        rows, weights = rows.to(dtype), weights.to(dtype)
    if _fused_kernel_takes(rows, weights):
        return torch._grouped_mm(rows, weights, offs=offsets)
    return grouped_mm_loop(rows, weights, offsets)


def _fused_kernel_takes(rows: Tensor, weights: Tensor) -> bool:
    """bf16 operands whose rows are 16-byte aligned, as `_grouped_mm` requires."""
    if rows.dtype not in FUSED_DTYPES or weights.dtype != rows.dtype:
        return False
    return all(size * rows.element_size() % 16 == 0 for size in (rows.shape[-1], weights.shape[-1]))


def _group_bounds(offsets: Tensor):
    start = 0
    for group, end in enumerate(offsets.tolist()):
        yield group, start, end
        start = end


@torch.library.custom_op("llmarch::grouped_mm", mutates_args=())
def grouped_mm_loop(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    out = rows.new_empty(rows.shape[0], weights.shape[-1])
    end = 0
    for group, start, end in _group_bounds(offsets):
        if end > start:
            torch.mm(rows[start:end], weights[group], out=out[start:end])
    out[end:].zero_()  # rows in no group
    return out


@grouped_mm_loop.register_fake
def _(rows: Tensor, weights: Tensor, offsets: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weights.shape[-1])


@torch.library.custom_op("llmarch::grouped_mm_weight_grad", mutates_args=())
def grouped_mm_weight_grad(rows: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    """The weights' gradient [groups, k, m]: rows[group]^T @ grad[group]; zero for an empty group."""
    out = rows.new_empty(offsets.shape[0], rows.shape[1], grad.shape[1])
    for group, start, end in _group_bounds(offsets):
        if end > start:
            torch.mm(rows[start:end].t(), grad[start:end], out=out[group])
        else:
            out[group].zero_()
    return out


@grouped_mm_weight_grad.register_fake
def _(rows: Tensor, grad: Tensor, offsets: Tensor) -> Tensor:
    return rows.new_empty(offsets.shape[0], rows.shape[1], grad.shape[1])


def _setup_context(ctx, inputs, output):
    rows, weights, offsets = inputs
    ctx.save_for_backward(rows, weights, offsets)


def _backward(ctx, grad):
    rows, weights, offsets = ctx.saved_tensors
    grad = grad.contiguous()
    grad_rows = grouped_mm_loop(grad, weights.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_weights = grouped_mm_weight_grad(rows, grad, offsets) if ctx.needs_input_grad[1] else None
    return grad_rows, grad_weights, None


grouped_mm_loop.register_autograd(_backward, setup_context=_setup_context)
