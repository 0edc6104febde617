"""Atomic writes: an output directory or file appears complete or not at all.

The new content is written into a directory made by `tempfile.mkdtemp` beside the output (a name
no user owns, unique per call), then renamed into place. Nothing is ever removed that the call did
not create: a user's `OUT.tmp` or `OUT.old` is never touched, and an existing output is replaced
only when asked to (`replace=True`), by an atomic exchange where the OS offers one (Linux
renameat2 RENAME_EXCHANGE), so a crash at any point leaves the old directory or the new one.
A crash can leave a hidden `.OUT.*.tmp` beside it (never read; safe to delete).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mtpkit.errors import MtpkitError


class OutputExistsError(MtpkitError, FileExistsError):
    """The output directory exists (and is not empty) and replacing it was not asked for."""


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15, glibc >= 2.28); False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _renameat2 = libc.renameat2
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    rc = _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _nonempty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike, replace: bool = False, exists_message: str | None = None
) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `out` when the block finishes.

    An existing empty `out` is replaced; a non-empty one only with `replace=True` (else
    OutputExistsError with `exists_message`). On an exception the temporary directory is removed
    and `out` is left as it was.
    """
    out = Path(out)
    message = exists_message or f"{out}: exists and is not empty"
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a directory")
    if _nonempty(out) and not replace:
        raise OutputExistsError(message)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, _umask_mode())  # mkdtemp makes it private; the output gets the usual mode
        yield tmp
        _commit(tmp, out, replace, message)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit(tmp: Path, out: Path, replace: bool, message: str) -> None:
    if not _nonempty(out):
        try:
            os.replace(tmp, out)  # onto nothing or an empty directory: atomic
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not replace:  # something was written into `out` meanwhile: keep it
                raise OutputExistsError(message) from None
    elif not replace:
        raise OutputExistsError(message)
    if _exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the replaced directory
        return
    # No atomic exchange: move the old one aside (a name of our own), then the new one in.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable: without it a crash can leave the old directory entry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `path` so that it holds either its old content or all of the new (a temporary file
    of a unique name beside it, fsynced, then renamed over it)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


__all__ = ["OutputExistsError", "atomic_dir", "atomic_write"]
