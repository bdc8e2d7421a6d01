"""Training data that needs no download: the `data` group.

Every source offers the same small interface (`DataSource`):
`batch(split, batch_size, seq_len, generator) -> (inputs, targets)` with targets
the next tokens (IGNORE where nothing is asked), `vocab_size` (the token ids it
uses), `has_accuracy` (whether exact-match accuracy on the targets means
something), `natural_seq_len` (the length it wants when `task.seq_len` is
null; None: the model's context) and `check_seq_len` (refuses, before any
training, a length it cannot serve).

Choices, each a typed node in Hydra's ConfigStore:
- `pydoc` (the default): `pydoc_data.topics`, which ships with every CPython:
  about 0.7 MB of English prose and code from the language reference, as bytes;
- `text`: a user's text file, or a folder of them (`data.path`), as bytes, or as
  the ids of a tokenizer saved in a local folder (`data.tokenizer`, read with
  transformers' AutoTokenizer, never downloaded);
- `recall`, `copy`, `sort`: synthetic tasks (llmarch_compose/synthetic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from ..errors import ConfigError, UnknownChoiceError
from .synthetic import SYNTHETIC
from ..config.structured import to_dataclass

BYTE_VOCAB = 256


class DataSource(Protocol):
    vocab_size: int
    has_accuracy: bool
    natural_seq_len: Optional[int]

    def check_seq_len(self, seq_len: int) -> None: ...  # raises ConfigError("task.seq_len") if unusable

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class PydocConfig:
    name: str = "pydoc"
    seed: Optional[int] = None  # the seed of the training stream; None: the run's seed
    holdout_fraction: float = 0.1  # the tail of the corpus kept for held-out loss


@dataclass
class TextConfig:
    name: str = "text"
    seed: Optional[int] = None
    holdout_fraction: float = 0.1
    path: Optional[str] = None  # a text file, or a folder searched with `glob`
    glob: str = "**/*.txt"
    tokenizer: Optional[str] = None  # a local folder for transformers' AutoTokenizer; None: bytes


class TokenCorpus:
    """A corpus as one stream of token ids, split into a training head and a held-out tail."""

    has_accuracy = False
    natural_seq_len = None

    def __init__(self, tokens: torch.Tensor, vocab_size: int, holdout_fraction: float):
        if not 0.0 < holdout_fraction < 1.0:
            raise ConfigError("data.holdout_fraction", holdout_fraction, "must lie in (0, 1)", "0 < x < 1")
        cut = int(len(tokens) * (1.0 - holdout_fraction))
        self.splits = {"train": tokens[:cut], "val": tokens[cut:]}
        self.vocab_size = vocab_size

    def check_seq_len(self, seq_len: int) -> None:
        for split, data in self.splits.items():
            if len(data) <= seq_len + 1:
                raise ConfigError("task.seq_len", seq_len, f"longer than the {split} split ({len(data)} tokens)",
                                  f"< {len(data) - 1}")

    def batch(self, split: str, batch_size: int, seq_len: int, generator: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows of `seq_len` inputs and their next-token targets."""
        self.check_seq_len(seq_len)
        data = self.splits[split]
        starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
        rows = torch.stack([data[s: s + seq_len + 1] for s in starts.tolist()]).long()
        return rows[:, :-1], rows[:, 1:]


def as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pydoc_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


def pydoc_source(cfg: PydocConfig) -> TokenCorpus:
    return TokenCorpus(as_bytes(pydoc_corpus()), BYTE_VOCAB, cfg.holdout_fraction)


def text_files(cfg: TextConfig) -> list[Path]:
    if not cfg.path:
        raise ConfigError("data.path", cfg.path, "data=text needs a text file or a folder of text files",
                          "a path, e.g. data.path=notes.txt")
    path = Path(cfg.path).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError("data.path", cfg.path, "no such file or folder", "an existing file or folder")
    files = sorted(p for p in path.glob(cfg.glob) if p.is_file())
    if not files:
        raise ConfigError("data.glob", cfg.glob, f"matches no file under {cfg.path}", "a pattern such as **/*.txt")
    return files


def load_tokenizer(folder: str) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError("data.tokenizer", folder, "a tokenizer needs the transformers package, not installed",
                          "null (bytes), after `pip install transformers` a local tokenizer folder") from None
    if not Path(folder).expanduser().is_dir():
        raise ConfigError("data.tokenizer", folder, "no such folder (tokenizers are read locally, never downloaded)",
                          "a folder written by a tokenizer's save_pretrained, or null for bytes")
    try:
        return AutoTokenizer.from_pretrained(str(Path(folder).expanduser()), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("data.tokenizer", folder, f"cannot load a tokenizer from it ({exc})",
                          "a folder written by a tokenizer's save_pretrained, or null for bytes") from None


def text_source(cfg: TextConfig) -> TokenCorpus:
    files = text_files(cfg)
    if cfg.tokenizer is None:
        return TokenCorpus(as_bytes(b"\n\n".join(p.read_bytes() for p in files)), BYTE_VOCAB, cfg.holdout_fraction)
    tokenizer = load_tokenizer(cfg.tokenizer)
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return TokenCorpus(torch.tensor(ids, dtype=torch.long), len(tokenizer), cfg.holdout_fraction)


#: data choice -> (its config node, the function or class that builds the source)
SOURCES: dict[str, tuple[type, Any]] = {"pydoc": (PydocConfig, pydoc_source), "text": (TextConfig, text_source),
                                        **SYNTHETIC}

for _name in ("pydoc", "text"):
    ConfigStore.instance().store(group="data", name=_name, node=SOURCES[_name][0], provider="llmarch_compose")

#: Synthetic problems are read left to right: each answer follows its question.
CAUSAL_ONLY = tuple(SYNTHETIC)


def data_config(node: DictConfig) -> Any:
    """The composed `data` node as its source's typed config."""
    name = node.get("name", "pydoc") if node is not None else "pydoc"
    if name not in SOURCES:
        raise UnknownChoiceError("data", name, SOURCES)
    return to_dataclass(SOURCES[name][0], node, "data")


def make_source(cfg: Any, objective: str, topology: str) -> DataSource:
    """The source a typed data config describes, checked against the objective of
    the topology that will train on it."""
    if cfg.name in CAUSAL_ONLY and objective != "causal_lm":
        raise ConfigError("data", cfg.name, f"a synthetic task needs a causal objective; topology={topology} "
                          f"trains with {objective}", "pydoc, text (or a decoder topology)")
    return SOURCES[cfg.name][1](cfg)


__all__ = ["DataSource", "TokenCorpus", "PydocConfig", "TextConfig", "SOURCES", "data_config", "make_source",
           "pydoc_corpus", "BYTE_VOCAB"]
