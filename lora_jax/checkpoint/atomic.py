"""Writing files and directories so that readers see the old one or the new one, never a mix.

New contents are written into a temporary sibling (same file system, so the final
``os.replace`` is a rename), flushed to disk, and moved into place; an existing
directory is first renamed aside, then deleted. A crash before the rename leaves only
a hidden ``.<name>.tmp-*`` sibling; a crash between the two renames leaves the old
contents in a hidden ``.<name>.old-*`` sibling.

What is replaced is decided up front (:func:`check_destination`): a regular file is
never replaced by a directory, and a non-empty directory only when it looks like
a previous output of the same writer (``ours``) or the caller passed ``overwrite=True``.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> out = replace_dir(root / "x", lambda d: (d / "f.txt").write_text("new"))
    >>> (out / "f.txt").read_text(), sorted(p.name for p in root.iterdir())
    ('new', ['x'])
    >>> (root / "notes.txt").write_text("mine") and None
    >>> replace_dir(root / "notes.txt", lambda d: None)
    Traceback (most recent call last):
    NotADirectoryError: replace_dir: .../notes.txt is a file, not a directory; nothing ...
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["atomic_file", "check_destination", "replace_dir"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk; best effort on platforms
    whose directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync(Path(dirpath) / f)
        _fsync(Path(dirpath))


def _names(d: Path, n: int = 8) -> str:
    names = sorted(p.name for p in d.iterdir())
    more = f" ... and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_destination(out: str | os.PathLike, *, what: str, overwrite: bool = False,
                      ours: Callable[[Path], bool] | None = None, kind: str = "output") -> Path:
    """``Path(out)`` if a writer may (re)place a directory there, else raise before writing.

    * a regular file at ``out`` (or at a parent): ``NotADirectoryError``, always;
    * a non-empty directory: ``FileExistsError`` unless ``ours(out)`` says it is a
      previous output of the same kind or ``overwrite=True``.
    Messages start with ``what`` and name the path and what is in it.
    """
    out = Path(os.fspath(out)).absolute()
    for p in (out, *out.parents):
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                raise NotADirectoryError(
                    f"{what}: {p} is a file, not a directory; nothing was written and the file "
                    "is left as it is. Pass the path of a new or empty directory.")
            break
    if out.is_dir() and not overwrite and any(out.iterdir()) and not (ours and ours(out)):
        unlike = f", and does not look like a {kind}" if ours else ""
        raise FileExistsError(
            f"{what}: {out} exists and is not empty{unlike} (it holds: {_names(out)}); "
            "nothing was written. Pass a new or empty directory, or overwrite=True to "
            "replace the whole directory.")
    return out


def replace_dir(out: str | os.PathLike, write: Callable[[Path], object], *,
                overwrite: bool = True, what: str = "replace_dir",
                ours: Callable[[Path], bool] | None = None, kind: str = "output") -> Path:
    """Fill a fresh directory with ``write(tmp_dir)`` and put it at ``out``.

    ``out`` is checked first (:func:`check_destination`: a file there is refused; a
    non-empty directory unless ``overwrite`` or ``ours(out)``), so nothing is written
    when it would be refused. Returns ``Path(out)``.
    """
    out = check_destination(out, what=what, overwrite=overwrite, ours=ours, kind=kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)
    except BaseException:
        _remove(tmp)
        raise
    return out


def atomic_file(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` into a temporary sibling file, flushed, then renamed to ``path``.

    A directory at ``path`` is refused (``IsADirectoryError``) before anything is written."""
    path = Path(os.fspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; nothing was written.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
