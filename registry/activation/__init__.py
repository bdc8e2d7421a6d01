"""Elementwise activations; the gated ones (GLU family) make the FFN gated."""

from . import gelu, relu, silu, swiglu_clamped  # noqa: F401
