"""Topologies: how blocks, norms, embeddings and heads are wired into a model."""

from . import decoder_only  # noqa: F401
