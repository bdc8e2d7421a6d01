"""One live run per output folder.

Two runs writing into one folder mix their metrics and can delete each other's
checkpoints (each keeps its newest `task.keep_checkpoints`). That happens more easily
than it sounds: `task.resume=auto` relaunched while the earlier job still runs, or the
ranks of a job whose launcher was killed, which torchrun leaves running in sessions of
their own. Rank 0 holds an exclusive `flock` on the folder itself for the whole run: no
file is added to it, and the kernel drops the lock when the process ends, however it
ends, so a killed run never leaves a stale lock behind. Where the file system cannot lock
a folder, the run goes on unguarded, as it would without this module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Optional

import torch.distributed as dist

from ..errors import ConfigError
from .parallel import SINGLE, World

try:
    import fcntl
except ImportError:  # not a POSIX system: no lock, as before
    fcntl = None


def _holder(folder: int) -> str:
    """Who holds the lock on the folder open as `folder`, from the kernel's table of locks
    (Linux); "another process" where that table is not there to read."""
    stat = os.fstat(folder)
    inode = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    try:
        with open("/proc/locks") as table:
            for line in table:  # "1: FLOCK  ADVISORY  WRITE 4242 08:01:1234 0 EOF"
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
                    return f"pid {fields[4]}"
    except OSError:
        pass
    return "another process"


def _take(out_dir: Path) -> tuple[Optional[int], Optional[str]]:
    """(the folder, open and locked, None), or (None, who holds it)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    folder = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(folder)
        os.close(folder)
        return None, holder
    except OSError:  # a file system that cannot lock a folder (some network ones)
        os.close(folder)
        return None, None
    return folder, None


@contextlib.contextmanager
def hold(out_dir: Path, world: World = SINGLE, key: str = "task.output") -> Iterator[None]:
    """Hold the folder for the run (rank 0 takes the lock; every rank learns whether it
    did, so all of them refuse together rather than some waiting for the others). `key`
    is the setting that chose the folder, named in the refusal."""
    folder, holder = _take(out_dir) if world.is_main and fcntl is not None else (None, None)
    if world.size > 1:
        shared = [holder]
        dist.broadcast_object_list(shared, src=0)
        holder = shared[0]
    if holder is not None:
        raise ConfigError(key, str(out_dir), f"another run is writing into this folder ({holder})",
                          "wait for that run to end or stop it, or a new folder")
    try:
        yield
    finally:
        if folder is not None:
            os.close(folder)  # closing it drops the lock


__all__ = ["hold"]
