"""Position encodings: added to embeddings, rotating queries and keys, or biasing scores."""

from . import learned, none, rope, sinusoidal  # noqa: F401
