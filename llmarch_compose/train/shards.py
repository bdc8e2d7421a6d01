"""Token shards: corpora tokenized once (`task=tokenize`) and read memory-mapped
(`data=tokens`), so a training run neither tokenizes nor holds its corpus in memory.

A shard folder holds `shards.json` and the shard files it lists:

    {"format": 1, "dtype": "uint16", "vocab_size": 256, "tokenizer": "bytes",
     "max_token_id": 255, "splits": {"train": [{"file": "train_000000.bin", "tokens": 1048576}, ...],
                                      "val": [{"file": "val_000000.bin", "tokens": 65536}]}}

Each file is the raw token ids, little-endian `dtype` (uint16 when the vocabulary fits,
else uint32). Windows are drawn by a vectorized gather from `numpy.memmap` views: one
shard is chosen per row (weighted by its length) and the row's ids are indexed at once,
with no Python loop over tokens. The held-out split is its own shard set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..artifacts.reading import read_json
from ..errors import ConfigError, LlmarchError
from ..plugin.interfaces import DataSource
from ..plugin.registry import register

INDEX = "shards.json"
FORMAT = 1
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
SPLITS = ("train", "val")


class ShardError(LlmarchError):
    """A shard folder whose index or files do not describe each other."""


def dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass
class TokensConfig:
    name: str = "tokens"
    seed: Optional[int] = None  # the seed of the training stream; None: the run's seed
    path: Optional[str] = None  # a folder `task=tokenize` wrote (its shards.json)


def _index(folder: Path, key: str) -> dict[str, Any]:
    if not (folder / INDEX).is_file():
        raise ConfigError(key, str(folder), f"holds no {INDEX}", "a folder written by llmarch task=tokenize")
    index = read_json(folder / INDEX, error=ShardError)
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ShardError(f"{folder / INDEX}: not a shard index of format {FORMAT}")
    if index.get("dtype") not in DTYPES:
        raise ShardError(f"{folder / INDEX}: dtype {index.get('dtype')!r} is not one of {sorted(DTYPES)}")
    for field in ("vocab_size", "max_token_id"):
        if not isinstance(index.get(field), int) or isinstance(index.get(field), bool) or index[field] < 0:
            raise ShardError(f"{folder / INDEX}: {field} must be a non-negative integer")
    if index["max_token_id"] >= index["vocab_size"]:
        raise ShardError(f"{folder / INDEX}: max_token_id {index['max_token_id']} is outside vocab_size "
                         f"{index['vocab_size']}")
    return index


def _open_split(folder: Path, index: dict[str, Any], split: str) -> list[np.memmap]:
    entries = (index.get("splits") or {}).get(split)
    if not isinstance(entries, list) or not entries:
        raise ShardError(f"{folder / INDEX}: lists no {split!r} shards")
    dtype, views = DTYPES[index["dtype"]], []
    for entry in entries:
        name, tokens = (entry.get("file"), entry.get("tokens")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
            raise ShardError(f"{folder / INDEX}: shard name {name!r} must be a file name inside the folder")
        if not isinstance(tokens, int) or tokens <= 0:
            raise ShardError(f"{folder / INDEX}: shard {name} must list a positive token count")
        file = folder / name
        size = file.stat().st_size if file.is_file() else None
        if size != tokens * dtype.itemsize:
            raise ShardError(f"{file}: {'missing' if size is None else f'{size} bytes'}, but {INDEX} lists "
                             f"{tokens} {index['dtype']} tokens ({tokens * dtype.itemsize} bytes)")
        views.append(np.memmap(file, dtype=dtype, mode="r"))
    return views


class TokenShards(DataSource):
    """Windows of token ids drawn from memory-mapped shards."""

    has_accuracy = False
    natural_seq_len = None

    def __init__(self, folder: Path, key: str = "data.path"):
        index = _index(folder, key)
        self.folder, self.vocab_size, self.max_token_id = folder, index["vocab_size"], index["max_token_id"]
        self.tokenizer = index.get("tokenizer")
        self.splits = {split: _open_split(folder, index, split) for split in SPLITS}

    def check_seq_len(self, seq_len: int) -> None:
        for split, shards in self.splits.items():
            longest = max(len(s) for s in shards)
            if longest <= seq_len + 1:
                raise ConfigError("task.seq_len", seq_len, f"longer than every {split} shard of {self.folder} "
                                  f"(the longest has {longest} tokens)", f"< {longest - 1}")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        shards = [s for s in self.splits[split] if len(s) > seq_len + 1]
        weights = torch.tensor([len(s) - seq_len - 1 for s in shards], dtype=torch.float64)
        which = torch.multinomial(weights, batch_size, replacement=True, generator=generator)
        starts = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * weights[which]).long()
        offsets = np.arange(seq_len + 1)
        rows = np.empty((batch_size, seq_len + 1), dtype=np.int64)
        for shard in which.unique().tolist():  # one gather per shard, not per token
            picked = (which == shard).nonzero().flatten().numpy()
            rows[picked] = shards[shard][starts.numpy()[picked, None] + offsets]
        if rows.max() > self.max_token_id:  # the index understated its ids: never index past the embedding
            raise ShardError(f"{self.folder}: a {split} shard holds id {rows.max()}, above the max_token_id "
                             f"{self.max_token_id} of its {INDEX}")
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]


@register("data", "tokens", params=TokensConfig)
def tokens_source(cfg: TokensConfig) -> TokenShards:
    """Memory-mapped token shards written by `task=tokenize`."""
    if not cfg.path:
        raise ConfigError("data.path", cfg.path, "data=tokens needs the folder task=tokenize wrote",
                          "a folder with shards.json")
    folder = Path(cfg.path).expanduser()
    if not folder.is_dir():
        raise ConfigError("data.path", cfg.path, "no such folder", "a folder written by llmarch task=tokenize")
    return TokenShards(folder)


class ShardWriter:
    """Writes one split's ids into files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: str, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, DTYPES[dtype], shard_tokens
        self.entries: list[dict[str, Any]] = []
        self._file, self._written = None, 0

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._file is None:
                name = f"{self.split}_{len(self.entries):06d}.bin"
                self._file, self._written = open(self.folder / name, "wb"), 0
                self.entries.append({"file": name, "tokens": 0})
            room = self.shard_tokens - self._written
            part, ids = ids[:room], ids[room:]
            self._file.write(part.tobytes())
            self._written += len(part)
            self.entries[-1]["tokens"] = self._written
            if self._written == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_index(folder: Path, dtype: str, vocab_size: int, max_token_id: int, tokenizer: str,
                splits: dict[str, list[dict[str, Any]]]) -> None:
    index = {"format": FORMAT, "dtype": dtype, "vocab_size": vocab_size, "tokenizer": tokenizer,
             "max_token_id": max_token_id, "splits": splits}
    (folder / INDEX).write_text(json.dumps(index, indent=1) + "\n")


__all__ = ["TokensConfig", "TokenShards", "ShardWriter", "ShardError", "write_index", "dtype_for", "INDEX"]
