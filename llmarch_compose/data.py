"""Training data that needs no download: a byte-level corpus embedded in Python itself.

`pydoc_data.topics` ships with every CPython: about 0.7 MB of English prose and
code from the language reference, enough for a small byte-level model to learn
visible structure in minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from hydra.core.config_store import ConfigStore

from .errors import ConfigError


@dataclass
class DataConfig:
    name: str = "pydoc"
    holdout_fraction: float = 0.1  # the tail of the corpus kept for held-out loss
    path: Optional[str] = None  # reserved for user text files


ConfigStore.instance().store(group="data", name="pydoc", node=DataConfig, provider="llmarch_compose")

BYTE_VOCAB = 256


def pydoc_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


class ByteCorpus:
    """A corpus as a byte tensor, split into a training head and a held-out tail."""

    def __init__(self, cfg: DataConfig):
        if cfg.name != "pydoc":
            raise ConfigError("data.name", cfg.name, "unknown data source", ["pydoc"])
        if not 0.0 < cfg.holdout_fraction < 1.0:
            raise ConfigError("data.holdout_fraction", cfg.holdout_fraction, "must lie in (0, 1)", "0 < x < 1")
        tokens = torch.frombuffer(bytearray(pydoc_corpus()), dtype=torch.uint8)
        cut = int(len(tokens) * (1.0 - cfg.holdout_fraction))
        self.splits = {"train": tokens[:cut], "val": tokens[cut:]}

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows of `seq_len` inputs and their next-byte targets."""
        data = self.splits[split]
        if len(data) <= seq_len + 1:
            raise ConfigError("task.seq_len", seq_len, f"longer than the {split} split ({len(data)} bytes)",
                              f"< {len(data) - 1}")
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]
