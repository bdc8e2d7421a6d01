"""Topologies: how blocks, norms, embeddings and heads are wired into a model."""

from . import decoder_only, encoder_decoder, encoder_only, prefix_decoder  # noqa: F401
