"""Attention: MHA, MQA and GQA are one module parameterized by the number of KV heads."""

from . import gqa  # noqa: F401
