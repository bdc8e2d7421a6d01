"""Tokenizer files kept beside the weights: a checkpoint trained with `data.tokenizer=...`
(and a Hugging Face folder `to_hf` writes from it) holds the files the tokenizer's
`save_pretrained` wrote, so the model reads and writes text as it was trained, with no
other folder needed.

Only data is copied: the files named in `TOKENIZER_FILES` (JSON, vocabularies, merges,
SentencePiece models), never Python a folder may also hold. Reading them back goes
through `llmarch_compose.train.data.load_tokenizer`, which refuses a tokenizer whose
configs name code of their own (`auto_map`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Union

#: The files a tokenizer's `save_pretrained` writes (fast and slow tokenizers alike).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
)


def tokenizer_files(folder: Union[str, Path]) -> list[Path]:
    """The tokenizer files `folder` holds (regular files only), in `TOKENIZER_FILES` order."""
    folder = Path(folder).expanduser()
    return [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]


def has_tokenizer(folder: Union[str, Path]) -> bool:
    """Whether `folder` holds a saved tokenizer (the configuration or the vocabulary of one)."""
    names = {p.name for p in tokenizer_files(folder)}
    return bool(names - {"special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                         "chat_template.json"})


def copy_tokenizer(source: Union[str, Path], target: Union[str, Path]) -> list[str]:
    """Copy the tokenizer files of `source` into the folder `target` (contents only: a
    link is copied as the file it points to); returns the names copied."""
    copied = []
    for file in tokenizer_files(source):
        shutil.copyfile(file, Path(target) / file.name)
        copied.append(file.name)
    return copied


__all__ = ["TOKENIZER_FILES", "tokenizer_files", "has_tokenizer", "copy_tokenizer"]
