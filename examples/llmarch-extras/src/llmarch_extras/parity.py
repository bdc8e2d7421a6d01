"""A data source: running parity of random bit strings (`data=parity`).

Each position's target is the parity of the bits so far, a task whose difficulty
grows with length and that tells architectures apart (attention must count).
Registered with `@register("data", ...)`, found through this package's entry point.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llmarch_compose import ConfigError, DataSource, register

#: Token ids: the bits, and the parities answered at each position.
ZERO, ONE = 0, 1
EVEN, ODD = 2, 3
#: Each split draws from its own stream (the salt is mixed into the drawn seed).
SPLIT_SALT = {"train": 0x0DD_0001, "val": 0x0DD_0002}


@dataclass
class ParityConfig:
    name: str = "parity"
    seed: Optional[int] = None  # the seed of the training stream; None: the run's seed
    length: int = 32  # bits per problem


@register("data", "parity", params=ParityConfig)
class Parity(DataSource):
    """Running parity: bits in, the parity of every prefix out (even or odd), answer accuracy recorded."""

    vocab_size = 4
    has_accuracy = True
    causal_only = True  # a prefix's parity depends on the bits before it only
    chance_accuracy = 0.5

    def __init__(self, cfg: ParityConfig):
        if cfg.length < 1:
            raise ConfigError("data.length", cfg.length, "a problem holds at least one bit", "an integer >= 1")
        self.cfg = cfg
        self.natural_seq_len = cfg.length

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len != self.cfg.length:
            raise ConfigError("task.seq_len", seq_len, f"parity problems are data.length={self.cfg.length} long",
                              f"{self.cfg.length}, or null")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_seq_len(seq_len)
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) ^ SPLIT_SALT[split]
        bits = torch.randint(0, 2, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
        parity = bits.cumsum(dim=1) % 2
        return bits + ZERO, parity + EVEN
