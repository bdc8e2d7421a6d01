"""Position-wise feed-forward networks: dense (gated or not) and mixture of experts."""

from . import dense, moe  # noqa: F401
