"""Attention: MHA, MQA and GQA are one module parameterized by the number of KV heads;
MLA (DeepSeek) expands keys and values from a cached low-rank latent."""

from . import gqa, mla  # noqa: F401
