"""Normalization layers; where they sit (pre, post) belongs to the topology."""

from . import layernorm, rmsnorm  # noqa: F401
