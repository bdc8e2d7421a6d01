"""Writing outputs so that a failed run never leaves half of one: a file or a whole
folder is written to a temporary sibling and renamed into place (`os.replace` is
atomic within a folder), so a reader sees the old output or the new one.

`atomic_path` is the file form, `atomic_folder` the folder form; both refuse an
existing destination when `overwrite=False` and remove the temporary sibling on
any error.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

PathLike = Union[str, os.PathLike]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


@contextlib.contextmanager
def _swap(path: PathLike, overwrite: bool, make: Callable[[Path], Path], mode: int,
          remove: Callable[[Path], None], put: Callable[[Path, Path], None]) -> Iterator[Path]:
    """The shared write-then-rename: `make` creates the temporary sibling, `put` moves it
    onto `path` once the block ends without an error, `remove` cleans it up otherwise."""
    path = Path(path)
    if not overwrite:
        _refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = make(path)
    try:
        yield tmp
        os.chmod(tmp, mode & ~umask())  # mkstemp/mkdtemp make it private; an output is not
        if not overwrite:
            _refuse_existing(path)  # again: something may have appeared while it was written
        put(tmp, path)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)


def _make_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _make_folder(path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))


def _replace_folder(tmp: Path, path: Path) -> None:
    """os.replace cannot put a folder over a non-empty one: the old one steps aside to
    `.<name>.old` first, comes back if the rename fails, and is removed after."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if not path.exists():
            os.replace(old, path)  # put the previous output back
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_path(path: PathLike, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling file of `path` (same suffix) to write; it replaces `path`
    only when the block ends without an error, and is removed otherwise."""
    return _swap(path, overwrite, _make_file, 0o666, os.unlink, os.replace)


def atomic_folder(path: PathLike, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling folder of `path` to fill; it takes `path`'s place, whole, only
    when the block ends without an error, and is removed otherwise. With overwrite=False
    an existing `path` is refused (FileExistsError) before and again after the writing;
    with overwrite=True a failed swap leaves the earlier folder in place."""
    return _swap(path, overwrite, _make_folder, 0o777, lambda tmp: shutil.rmtree(tmp, ignore_errors=True),
                 _replace_folder)


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write text or bytes to `path` whole, or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
