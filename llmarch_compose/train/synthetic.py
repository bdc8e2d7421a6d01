"""Synthetic tasks on which architecture choices visibly matter (`data=recall`, `copy`, `sort`).

Each problem is a short token sequence with a question part and an answer part;
only the answers are targets (every other target is IGNORE), so the loss and the
exact-match accuracy measure the skill alone. Problems are drawn from the
generator handed to `batch`, so a run is determined by its seed.

Token ids: 0 is the filler (left padding and the gap between pairs and queries),
1 the separator, and each task's symbols follow from 2 on, so a task's vocabulary
is a few dozen ids, inside any model's.

- `recall` (multi-query associative recall): `num_pairs` key-value pairs, a gap,
  then `num_queries` of the keys, each followed by its value. Keys and values are
  drawn from disjoint ranges; keys are distinct within a problem, values are drawn
  independently (with replacement). The queried keys are drawn with replacement, and
  only a key's first query is an answer: a repeated query's value sits a few positions
  after the earlier one, where any attention could copy it, so it is left unscored.
  Every scored answer is then independent of all the tokens near it. A key's query
  comes at least `min_distance` positions after the key (its value one position
  less), so attention whose reach is shorter, e.g. a sliding window of w tokens
  over L layers reaching L * (w - 1) positions back, cannot find the answer:
  it stays at chance, 1 / num_values (`attention=swa model.window=8` over 2
  layers reaches 14 positions back; the nearest pair is 15 or 16 away). Attention
  that reaches the pairs but has not learned to match keys plateaus near
  1 / num_pairs (it picks one of the values it sees, a little above that where it
  rules out the pair an earlier, different query asked); learning recall itself
  is a phase change after that plateau (README: "A recall recipe").
- `copy`: `length` random symbols, the separator, then the same symbols.
- `sort`: `length` random symbols, the separator, then the symbols in ascending order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..plugin.interfaces import DataSource
from ..plugin.objectives import IGNORE
from ..plugin.registry import register

FILLER, SEPARATOR, FIRST_SYMBOL = 0, 1, 2
SPLIT_SALT = {"train": 0x5EED_0001, "val": 0x5EED_0002}


@dataclass
class RecallConfig:
    name: str = "recall"
    seed: Optional[int] = None  # the seed of the training stream; None: the run's seed
    num_pairs: int = 6
    num_queries: int = 3  # keys of the problem's pairs, drawn with replacement; repeats are not scored
    min_distance: int = 16  # positions from a key to its query, at least
    num_keys: int = 16
    num_values: int = 16


@dataclass
class CopyConfig:
    name: str = "copy"
    seed: Optional[int] = None
    length: int = 16
    num_symbols: int = 16


@dataclass
class SortConfig:
    name: str = "sort"
    seed: Optional[int] = None
    length: int = 16
    num_symbols: int = 16


def require_at_least(cfg, field: str, minimum: int) -> None:
    value = getattr(cfg, field)
    if value < minimum:
        raise ConfigError(f"data.{field}", value, f"must be at least {minimum}", f"an integer >= {minimum}")


class SyntheticTask(DataSource):
    """The shared mechanics: problems of one length, left-padded with filler to the
    asked length, answers as the only targets."""

    has_accuracy = True
    causal_only = True  # each answer follows its question

    def __init__(self, cfg):
        self.cfg = cfg

    # A subclass defines these two.
    vocab_size: int
    chance_accuracy: float

    @property
    def problem_len(self) -> int:
        """Input positions one problem needs (its tokens less the last, which is only a target)."""
        raise NotImplementedError

    def problems(self, count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(`count` problems as token ids [count, problem_len + 1], which of those tokens are answers)."""
        raise NotImplementedError

    @property
    def natural_seq_len(self) -> int:
        return self.problem_len

    def check_seq_len(self, seq_len: int) -> None:
        if seq_len < self.problem_len:
            raise ConfigError("task.seq_len", seq_len, f"shorter than one {self.cfg.name} problem "
                              f"({self.problem_len} positions)", f">= {self.problem_len}, or null")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_seq_len(seq_len)
        # Each split draws from its own stream, so the held-out problems never
        # replay a training stream that happens to share the evaluation seed.
        seed = int(torch.randint(0, 2**62, (1,), generator=generator)) ^ SPLIT_SALT[split]
        tokens, answers = self.problems(batch_size, torch.Generator().manual_seed(seed))
        pad = seq_len - self.problem_len
        tokens = torch.nn.functional.pad(tokens, (pad, 0), value=FILLER)
        answers = torch.nn.functional.pad(answers, (pad, 0), value=False)
        targets = tokens[:, 1:].masked_fill(~answers[:, 1:], IGNORE)
        return tokens[:, :-1], targets


class Recall(SyntheticTask):
    def __init__(self, cfg: RecallConfig):
        for field in ("num_pairs", "num_queries", "num_keys", "num_values"):
            require_at_least(cfg, field, 1)
        require_at_least(cfg, "min_distance", 2)  # a query comes after its own pair
        if cfg.num_pairs > cfg.num_keys:
            raise ConfigError("data.num_pairs", cfg.num_pairs,
                              f"keys are distinct within a problem and data.num_keys={cfg.num_keys}",
                              f"1..{cfg.num_keys}")
        super().__init__(cfg)
        self.first_value = FIRST_SYMBOL + cfg.num_keys
        self.vocab_size = self.first_value + cfg.num_values
        self.chance_accuracy = 1.0 / cfg.num_values
        # The last key sits two positions before the gap; the first query right after it.
        self.gap = cfg.min_distance - 2

    @property
    def problem_len(self) -> int:
        return 2 * self.cfg.num_pairs + self.gap + 2 * self.cfg.num_queries - 1

    def problems(self, count, generator):
        c = self.cfg
        keys = torch.rand(count, c.num_keys, generator=generator).argsort(dim=1)[:, :c.num_pairs] + FIRST_SYMBOL
        values = torch.randint(self.first_value, self.vocab_size, (count, c.num_pairs), generator=generator)
        asked = torch.randint(0, c.num_pairs, (count, c.num_queries), generator=generator)  # with replacement
        pairs = torch.stack((keys, values), dim=2).flatten(1)
        queries = torch.stack((keys.gather(1, asked), values.gather(1, asked)), dim=2).flatten(1)
        gap = torch.full((count, self.gap), FILLER)
        tokens = torch.cat((pairs, gap, queries), dim=1)
        # The value after each queried key, where that key is asked for the first time.
        earlier = torch.ones(c.num_queries, c.num_queries, dtype=torch.bool).tril(-1)
        repeated = ((asked[:, :, None] == asked[:, None, :]) & earlier).any(dim=2)
        answers = torch.zeros_like(tokens, dtype=torch.bool)
        answers[:, -2 * c.num_queries + 1::2] = ~repeated
        return tokens, answers


class SeparatedTask(SyntheticTask):
    """`length` symbols, the separator, then a function of the symbols (the answers)."""

    def __init__(self, cfg):
        require_at_least(cfg, "length", 1)
        require_at_least(cfg, "num_symbols", 2)
        super().__init__(cfg)
        self.vocab_size = FIRST_SYMBOL + cfg.num_symbols
        self.chance_accuracy = 1.0 / cfg.num_symbols

    @property
    def problem_len(self) -> int:
        return 2 * self.cfg.length

    @staticmethod
    def answer(symbols: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def problems(self, count, generator):
        n = self.cfg.length
        symbols = torch.randint(FIRST_SYMBOL, self.vocab_size, (count, n), generator=generator)
        separator = torch.full((count, 1), SEPARATOR)
        tokens = torch.cat((symbols, separator, self.answer(symbols)), dim=1)
        answers = torch.zeros_like(tokens, dtype=torch.bool)
        answers[:, n + 1:] = True
        return tokens, answers


class Copy(SeparatedTask):
    @staticmethod
    def answer(symbols):
        return symbols


class Sort(SeparatedTask):
    @staticmethod
    def answer(symbols):
        return symbols.sort(dim=1).values


for _name, _config, _task in (("recall", RecallConfig, Recall), ("copy", CopyConfig, Copy),
                               ("sort", SortConfig, Sort)):
    register("data", _name, params=_config)(_task)
