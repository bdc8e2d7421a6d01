"""Elementwise activations; the gated ones (GLU family) make the FFN gated."""

from . import gelu, relu, silu  # noqa: F401
