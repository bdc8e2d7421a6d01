"""`task=tokenize`: text files or folders to token shards that `data=tokens` reads.

    llmarch task=tokenize task.input=corpus/ task.output=shards/ [task.tokenizer=tokenizer.json]

Bytes by default (vocabulary 256), or the ids of a local `tokenizers` file
(`tokenizer.json`: data, never code). Files are tokenized in parallel worker processes
and written in their sorted order, each file's last `task.holdout_fraction` of ids to
the held-out shards and the rest to the training shards (files are joined by a blank
line, as `data=text` joins them). The folder appears complete or not at all.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..artifacts.atomic import atomic_folder
from ..config.structured import to_dataclass
from ..errors import ConfigError
from ..plugin.registry import register
from ..train.data import BYTE_VOCAB, TextConfig, text_files
from ..train.shards import ShardWriter, dtype_for, write_index

SEPARATOR = "\n\n"


@dataclass
class TokenizeTask:
    name: str = "tokenize"
    input: Optional[str] = None  # a text file, or a folder searched with `glob`
    glob: str = "**/*.txt"
    output: Optional[str] = None  # the folder to create (must not exist)
    tokenizer: Optional[str] = None  # a `tokenizers` tokenizer.json; None: bytes
    holdout_fraction: float = 0.1  # each file's tail kept for held-out loss
    shard_tokens: int = 1 << 24  # tokens per shard file at most
    workers: int = 0  # tokenizing processes; 0: one per core
    progress: bool = True


_tokenizer: Any = None


def _start_worker(tokenizer_file: Optional[str]) -> None:
    global _tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the processes are the parallelism
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        _tokenizer = Tokenizer.from_file(tokenizer_file)


def _ids(job: tuple[str, bool]) -> np.ndarray:
    """One file's ids (a blank line before every file but the first)."""
    path, first = job
    if _tokenizer is None:
        data = (b"" if first else SEPARATOR.encode()) + Path(path).read_bytes()
        return np.frombuffer(data, dtype=np.uint8).copy()
    text = ("" if first else SEPARATOR) + Path(path).read_text(encoding="utf-8", errors="replace")
    return np.asarray(_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def _vocab_size(tokenizer_file: Optional[str]) -> int:
    if tokenizer_file is None:
        return BYTE_VOCAB
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError("task.tokenizer", tokenizer_file, "needs the tokenizers package, not installed",
                          "null (bytes), or pip install tokenizers") from None
    if not Path(tokenizer_file).is_file():
        raise ConfigError("task.tokenizer", tokenizer_file, "no such file", "a tokenizer.json, or null for bytes")
    try:
        return Tokenizer.from_file(tokenizer_file).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - the library raises its own exception types
        raise ConfigError("task.tokenizer", tokenizer_file, f"not a tokenizers file ({exc})",
                          "a tokenizer.json written by the tokenizers library, or null for bytes") from None


def check(task: TokenizeTask) -> None:
    if not task.output:
        raise ConfigError("task.output", task.output, "name the folder to write", "a path that does not exist")
    if Path(task.output).exists():
        raise ConfigError("task.output", task.output, "already exists", "a path that does not exist")
    if not 0.0 < task.holdout_fraction < 1.0:
        raise ConfigError("task.holdout_fraction", task.holdout_fraction, "must lie in (0, 1)", "0 < x < 1")
    if not 1 <= task.shard_tokens <= 1 << 40:
        raise ConfigError("task.shard_tokens", task.shard_tokens, "must be an integer in 1..2^40", "e.g. 16777216")
    if not 0 <= task.workers <= 1024:
        raise ConfigError("task.workers", task.workers, "must be an integer in 0..1024", "0 (one per core)")


@register("task", "tokenize", params=TokenizeTask)
def run(cfg: DictConfig) -> dict[str, Any]:
    task = to_dataclass(TokenizeTask, cfg.task, "task")
    check(task)
    try:
        files = text_files(TextConfig(path=task.input, glob=task.glob))
    except ConfigError as exc:  # the same checks as data=text, named by this task's keys
        raise ConfigError(exc.key.replace("data.path", "task.input").replace("data.glob", "task.glob"), exc.value,
                          exc.problem, exc.valid) from None
    vocab_size = _vocab_size(task.tokenizer)
    dtype = dtype_for(vocab_size)
    workers = task.workers or os.cpu_count() or 1
    counts = {"train": 0, "val": 0}
    max_id = 0
    with atomic_folder(task.output, overwrite=False) as folder:
        writers = {split: ShardWriter(folder, split, dtype, task.shard_tokens) for split in counts}
        jobs = [(str(p), i == 0) for i, p in enumerate(files)]
        with ProcessPoolExecutor(workers, initializer=_start_worker, initargs=(task.tokenizer,)) as pool:
            for ids in tqdm(pool.map(_ids, jobs, chunksize=4), total=len(jobs), desc="tokenize", unit="file",
                            disable=not task.progress):
                if not len(ids):
                    continue
                max_id = max(max_id, int(ids.max()))
                cut = len(ids) - int(len(ids) * task.holdout_fraction)
                for split, part in (("train", ids[:cut]), ("val", ids[cut:])):
                    writers[split].write(part)
                    counts[split] += len(part)
        for writer in writers.values():
            writer.close()
        empty = [split for split, n in counts.items() if n == 0]
        if empty:
            raise ConfigError("task.input", task.input, f"gives no {empty[0]} tokens (too little text for "
                              f"holdout_fraction={task.holdout_fraction})", "more text, or another holdout_fraction")
        write_index(folder, dtype, vocab_size, max_id, task.tokenizer or "bytes",
                    {split: w.entries for split, w in writers.items()})
    print(f"{len(files)} files -> {counts['train']:,} training and {counts['val']:,} held-out tokens "
          f"({dtype}, vocabulary {vocab_size:,}) in {task.output}")
    return {"files": len(files), "tokens": counts, "dtype": dtype, "vocab_size": vocab_size,
            "output": task.output}


__all__ = ["TokenizeTask", "run"]
