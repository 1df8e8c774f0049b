"""Atomic result files: a file is either complete or absent, whatever kills the process.

A file is written to a temporary file beside it, flushed, given the mode an ordinary file gets
(0o666 less the umask: 0644 under the default umask; the temporary file's 0600 would otherwise
survive the rename) and renamed over the target. A write that fails (a full disk, a quota, a
read-only directory) removes the temporary file, leaves any earlier file at that path as it
was, and raises OutputWriteError naming the path and the cause.
"""

from __future__ import annotations

import errno
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from sheafscope.errors import OutputWriteError

_NO_SPACE = {errno.ENOSPC: "no space left on device", getattr(errno, "EDQUOT", -1): "disk quota exceeded"}


def _clean(obj: Any) -> Any:
    # JSON has no NaN/Inf: write null so that every reader parses the file.
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _clean(obj.item())
    return obj


def current_umask() -> int:
    """The process umask (read by setting and restoring it: there is no other portable way)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain open() would create a file with: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def write_error(path: Path, e: OSError) -> OutputWriteError:
    """OutputWriteError for an OSError met while writing `path`: the cause in words and the fix."""
    if e.errno in _NO_SPACE:
        return OutputWriteError(f"{_NO_SPACE[e.errno]} while writing {path}; free space and rerun")
    cause = (e.strerror or type(e).__name__).lower()
    return OutputWriteError(f"{cause} while writing {path}; make {path.parent} writable (or choose another --out) and rerun")


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise write_error(path, e) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: str | None) -> None:
    if tmp is not None:
        try:
            Path(tmp).unlink(missing_ok=True)
        except OSError:
            pass


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(_clean(obj), indent=1, allow_nan=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
