"""Atomic file writes.

A write goes to a temporary file in the destination's own directory, is flushed and synced,
and is then moved over the destination with :func:`os.replace`. A rename within one directory
is atomic on POSIX and on Windows (NTFS), so a reader sees either the old file or the new
one, never a prefix of the new one, and an interrupted write leaves only a temporary file,
which is removed on the way out when Python still runs.

:func:`commit_files` extends this to a set of files that belong together (a scan's outputs):
every file is first staged in full, and only when all of them have been produced are they
moved into place, one rename each.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "commit_files"]

logger = logging.getLogger(__name__)

_TMP_PREFIX = ".critlayers-tmp-"


def _fsync_dir(path: Path) -> None:
    # Persist the rename itself; not possible (nor needed) on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _stage(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file next to ``path``; return the temporary path."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.name, dir=path.parent)
    try:
        # mkstemp creates the file private (0600); results get the usual mode for new files.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename).

    Args:
        path: destination file; its parent folder is created when missing.
        data: the complete new content.

    Returns:
        The destination as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _stage(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def commit_files(
    out_dir: str | os.PathLike, producers: Mapping[str, Callable[[], bytes]]
) -> dict[str, Path]:
    """Produce a set of files and move them into ``out_dir`` only once all of them exist.

    Each producer returns the complete bytes of one file. All producers run and all files are
    staged as temporary files inside ``out_dir`` before the first destination is touched, so a
    failure while producing or writing any file (an exception, a full disk, an interrupt)
    leaves every earlier file in ``out_dir`` exactly as it was and removes the staged ones.
    The files are then renamed into place in the order given; put the file that readers look
    for first (an index such as ``scan.json``) last.

    Note:
        Files are swapped one by one rather than by swapping a whole folder, because the
        output folder may be shared with unrelated files (``--out .``) that a folder swap
        would remove. The renames are metadata operations within one folder; only a crash of
        the machine between two of them could leave a mix of old and new files.

    Args:
        out_dir: destination folder, created when missing.
        producers: file name (no folders) to a zero-argument callable returning bytes.

    Returns:
        File name to final path, in the order given.

    Raises:
        ValueError: if a file name contains a path separator.
    """
    out_dir = Path(out_dir)
    for name in producers:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"commit_files: producers keys must be plain file names, got {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for name, produce in producers.items():
            staged[name] = _stage(out_dir / name, produce())
    except BaseException:
        for tmp in staged.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    done: dict[str, Path] = {}
    try:
        for name, tmp in staged.items():
            os.replace(tmp, out_dir / name)
            done[name] = out_dir / name
    finally:
        for name, tmp in staged.items():
            if name not in done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    _fsync_dir(out_dir)
    logger.debug("wrote %d files to %s", len(done), out_dir)
    return done
