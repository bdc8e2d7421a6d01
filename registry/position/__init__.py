"""Position encodings: added to embeddings, rotating queries and keys, or biasing scores."""

from . import alibi, learned, none, relative_bias, rope, rope_2d, sinusoidal  # noqa: F401
