"""Writing outputs so that a failed or killed run never leaves half of one: a file or a
whole folder is written to a temporary sibling, fsynced, and put into place in one
atomic step, so a reader sees the old output or the new one, at every instant.

- A file, or a folder where nothing is yet, is renamed into place (`os.replace`).
- A folder over an existing one is swapped with it in one step where the system
  can (Linux's `renameat2(RENAME_EXCHANGE)`), and the old one, now under the
  temporary name, is removed. Elsewhere the old folder steps aside to
  `.<name>.old` and the new one takes its place: `published` and the next write
  find the old folder there if a kill fell between the two renames.
- Temporary siblings carry the writer's process id (`.<name>.tmp-<pid>-...`);
  those of processes no longer running (a killed save) are removed by the next
  write to the same path.

`atomic_path` is the file form, `atomic_folder` the folder form; both refuse an
existing destination when `overwrite=False` and remove the temporary sibling on
any error.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(path: Path) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


# ---------------------------------------------------------------- durability


def fsync_folder(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # a system without directory handles (Windows)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):  # file systems that refuse it
            raise
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Every file's data and every folder's entries under `root`, on disk, before the
    rename that publishes them (else a crash could publish empty files)."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_folder(Path(folder))


# ---------------------------------------------------------------- temporary siblings


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp-{os.getpid()}-"


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process, or no way to tell: keep its files
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def recover(path: PathLike) -> None:
    """Finish what a killed write to `path` left: a folder stepped aside (`.<name>.old`)
    comes back if nothing took its place, or is removed if something did; the
    temporary siblings of processes that are no longer running are removed."""
    path = Path(path)
    old = _old(path)
    if old.is_dir():
        if os.path.lexists(path):
            _remove(old)
        else:
            os.replace(old, path)
            fsync_folder(path.parent)
    marker = f".{path.name}.tmp-"
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(path.parent):
            if not entry.name.startswith(marker):
                continue
            pid = entry.name[len(marker):].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                _remove(Path(entry.path))


def published(path: PathLike) -> Path:
    """Where the complete folder written as `path` is: `path`, or the earlier folder a
    kill left stepped aside (`.<name>.old`, only on systems without an atomic exchange)."""
    path = Path(path)
    if not os.path.lexists(path) and _old(path).is_dir():
        return _old(path)
    return path


# ---------------------------------------------------------------- publishing


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # the kernel or file system lacks it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _replace_file(tmp: Path, path: Path) -> None:
    _fsync_file(tmp)
    os.replace(tmp, path)
    fsync_folder(path.parent)


def _replace_folder(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path`, which holds a complete folder (the new
    one or the old one) at every instant."""
    _fsync_tree(tmp)
    try:
        os.replace(tmp, path)  # nothing there (or an empty folder): one rename
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        if _exchange(tmp, path):
            fsync_folder(path.parent)  # the old folder is now at `tmp`, removed by the caller
            return
        _replace_by_two_renames(tmp, path)
    fsync_folder(path.parent)


def _replace_by_two_renames(tmp: Path, path: Path) -> None:
    """Without an exchange: the old folder steps aside to `.<name>.old` (where
    `published` finds it), comes back if the second rename fails, and is removed after."""
    old = _old(path)
    _remove(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if not os.path.lexists(path):
            os.replace(old, path)  # put the previous output back
        raise
    fsync_folder(path.parent)
    _remove(old)


@contextlib.contextmanager
def _swap(path: PathLike, overwrite: bool, make: Callable[[Path], Path], mode: int,
          put: Callable[[Path, Path], None]) -> Iterator[Path]:
    """The shared write-then-rename: `make` creates the temporary sibling, `put` moves it
    onto `path` once the block ends without an error; it is removed in every case."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover(path)
    if not overwrite:
        _refuse_existing(path)
    tmp = make(path)
    try:
        yield tmp
        os.chmod(tmp, mode & ~umask())  # mkstemp/mkdtemp make it private; an output is not
        if not overwrite:
            _refuse_existing(path)  # again: something may have appeared while it was written
        put(tmp, path)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def _make_file(path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=path.suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _make_folder(path: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))


def atomic_path(path: PathLike, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling file of `path` (same suffix) to write; it replaces `path`
    only when the block ends without an error, and is removed otherwise."""
    return _swap(path, overwrite, _make_file, 0o666, _replace_file)


def atomic_folder(path: PathLike, overwrite: bool = True) -> contextlib.AbstractContextManager[Path]:
    """A temporary sibling folder of `path` to fill; it takes `path`'s place, whole, only
    when the block ends without an error, and is removed otherwise. With overwrite=False
    an existing `path` is refused (FileExistsError) before and again after the writing;
    with overwrite=True a failed swap leaves the earlier folder in place."""
    return _swap(path, overwrite, _make_folder, 0o777, _replace_folder)


def write_atomic(path: PathLike, data: Union[bytes, str]) -> None:
    """Write text or bytes to `path` whole, or not at all."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def creatable_folder(path: PathLike) -> Optional[str]:
    """Why the folder `path` cannot be created or written here (None: it can), found by
    making and removing a probe in its deepest existing ancestor, so nothing is left
    behind and a path the system refuses (a file on the way, `/proc`, no permission)
    is named before a run starts."""
    path = Path(path).expanduser().absolute()
    ancestor = path
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".llmarch-probe-", dir=ancestor))
    except OSError as exc:
        return f"cannot create a folder in {ancestor}: {exc.strerror or exc}"
    return None


__all__ = ["atomic_folder", "atomic_path", "write_atomic", "published", "recover", "creatable_folder"]
