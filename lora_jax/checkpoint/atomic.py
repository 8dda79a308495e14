"""Writing a whole directory so that readers see the old one or the new one, never a mix.

The new contents are written into a temporary sibling (same file system, so the final
``os.replace`` is a rename) and moved into place; an existing directory is first
renamed aside, then deleted. A crash before the rename leaves only a hidden
``.<name>.tmp-*`` sibling; a crash between the two renames leaves the old contents in
a hidden ``.<name>.old-*`` sibling.

Example:
    >>> import pathlib, tempfile
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> out = replace_dir(root / "x", lambda d: (d / "f.txt").write_text("new"))
    >>> (out / "f.txt").read_text(), sorted(p.name for p in root.iterdir())
    ('new', ['x'])
    >>> import shutil; shutil.rmtree(root)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable

__all__ = ["replace_dir"]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(out: str | os.PathLike, write: Callable[[Path], object], *,
                overwrite: bool = True, what: str = "replace_dir") -> Path:
    """Fill a fresh directory with ``write(tmp_dir)`` and put it at ``out``.

    With ``overwrite=False`` an existing non-empty ``out`` (or a file there) raises
    ``FileExistsError`` (the message starts with ``what``) before anything is written.
    Returns ``Path(out)``.
    """
    out = Path(os.fspath(out))
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{what}: {out} exists and is not empty; pass overwrite=True.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists() or out.is_symlink():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            _remove(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise
    return out
