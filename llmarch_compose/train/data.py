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
- `tokens`: memory-mapped token shards `task=tokenize` wrote (llmarch_compose/train/shards.py);
- `recall`, `copy`, `sort`: synthetic tasks (llmarch_compose/train/synthetic.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from ..artifacts.reading import read_json
from ..config.spec import make_choice
from ..errors import ConfigError, LlmarchError
from ..plugin import registry as plugins
from ..plugin.interfaces import DataSource
from ..plugin.objectives import Objective
from ..plugin.registry import register
from . import shards, synthetic  # noqa: F401  (register token shards and the synthetic tasks beside the text sources)

BYTE_VOCAB = 256


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


class TokenCorpus(DataSource):
    """A corpus as one stream of token ids, split into a training head and a held-out tail."""

    has_accuracy = False
    natural_seq_len = None

    def __init__(self, tokens: torch.Tensor, vocab_size: int, holdout_fraction: float):
        if len(tokens) == 0:
            raise ConfigError("data.path", None, "holds no text (every file is empty)", "a file or folder with text")
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
    if not data:  # frombuffer refuses an empty buffer
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pydoc_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics)).encode("utf-8")


@register("data", "pydoc", params=PydocConfig)
def pydoc_source(cfg: PydocConfig) -> TokenCorpus:
    """Python's own documentation (pydoc_data.topics), as bytes: no download."""
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
    if not cfg.glob:
        raise ConfigError("data.glob", cfg.glob, "an empty pattern matches nothing", "a pattern such as **/*.txt")
    files = sorted(p for p in path.glob(cfg.glob) if p.is_file())
    if not files:
        raise ConfigError("data.glob", cfg.glob, f"matches no file under {cfg.path}", "a pattern such as **/*.txt")
    return files


def refuse_remote_code(folder: str, path: Path, key: str = "data.tokenizer") -> None:
    """A folder whose configs map classes to its own Python (`auto_map`) is refused: a
    tokenizer is data, and loading one never runs code that came with it."""
    for name in ("tokenizer_config.json", "config.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            content = read_json(file)
        except LlmarchError as exc:
            raise ConfigError(key, folder, str(exc), "a folder written by a tokenizer's "
                              "save_pretrained, or null for bytes") from None
        if isinstance(content, dict) and "auto_map" in content:
            raise ConfigError(key, folder, f"{file} has auto_map: loading it would run the folder's "
                              "own Python, which is never done", "a tokenizer transformers implements itself "
                              "(no auto_map), or null for bytes")


def load_tokenizer(folder: str, key: str = "data.tokenizer") -> Any:
    """The tokenizer saved in the local `folder` (never downloaded, never code of its own);
    errors name `key`, the setting that pointed at the folder."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(key, folder, "a tokenizer needs the transformers package, not installed",
                          "null (bytes), after `pip install transformers` a local tokenizer folder") from None
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ConfigError(key, folder, "no such folder (tokenizers are read locally, never downloaded)",
                          "a folder written by a tokenizer's save_pretrained, or null for bytes")
    refuse_remote_code(folder, path, key)
    try:
        # trust_remote_code=False: transformers refuses custom code instead of asking on stdin.
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, LlmarchError) as exc:
        raise ConfigError(key, folder, f"cannot load a tokenizer from it ({exc})",
                          "a folder written by a tokenizer's save_pretrained, or null for bytes") from None


@register("data", "text", params=TextConfig)
def text_source(cfg: TextConfig) -> TokenCorpus:
    """A text file or a folder of them, as bytes or as the ids of a local tokenizer."""
    files = text_files(cfg)
    if cfg.tokenizer is None:
        return TokenCorpus(as_bytes(b"\n\n".join(p.read_bytes() for p in files)), BYTE_VOCAB, cfg.holdout_fraction)
    tokenizer = load_tokenizer(cfg.tokenizer)
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return TokenCorpus(torch.tensor(ids, dtype=torch.long), len(tokenizer), cfg.holdout_fraction)


def data_config(node: DictConfig) -> Any:
    """The composed `data` node as its source's typed config."""
    return make_choice("data", node)


def make_source(cfg: Any, objective: Objective, topology: str) -> DataSource:
    """The source a typed data config describes, checked against the objective of
    the topology that will train on it."""
    source = plugins.get("data", cfg.name).target(cfg)
    if source.causal_only and not objective.causal:
        raise ConfigError("data", cfg.name, f"this task is read left to right and needs a causal objective; "
                          f"topology={topology} trains with {objective.name}",
                          "a decoder topology, or a text source such as data=pydoc")
    return source


__all__ = ["DataSource", "TokenCorpus", "PydocConfig", "TextConfig", "data_config", "make_source",
           "pydoc_corpus", "BYTE_VOCAB"]
