"""Atomic file and folder writes: a reader never sees a half-written file, a killed job loses nothing it had
finished."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o644)  # mkstemp makes files private (0600); results are ordinary files
    try:
        with refused_writes_in_one_line(path):
            yield tmp_path
            with open(tmp_path, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextmanager
def atomic_folder(out: str | os.PathLike, merge=None) -> Iterator[Path]:
    """Yield a temporary folder next to `out`, moved into place only if the block succeeds: renamed over a missing
    or empty `out`, or, into a folder that holds files, by `merge(tmp, out)` (without one, such a folder is an
    error its caller should have refused up front). A write the system refused becomes `write_failure`'s one line;
    the temporary folder is removed whatever happens."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        with refused_writes_in_one_line(out):
            yield tmp
            if out.is_dir() and any(out.iterdir()):
                if merge is None:
                    raise FileExistsError(f"{out} is not empty")
                merge(tmp, out)
            else:
                if out.is_dir():
                    out.rmdir()
                os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def refused_writes_in_one_line(path: str | os.PathLike) -> Iterator[None]:
    """A write to `path` that the system refuses inside the block raises `write_failure`'s one line instead."""
    try:
        yield
    except Exception as e:
        failure = write_failure(e, path)
        if failure is None:
            raise
        raise failure from None


def write_failure(error: BaseException, path: str | os.PathLike):
    """A one-line BitplanError for a write that the system refused (disk full, quota, I/O error, permissions), or
    None for any other error. Safetensors reports such failures as its own error type with the OS error in the
    text ("Os { code: 28, ... }"), so that form counts too. Nothing at `path` was replaced."""
    from .errors import BitplanError

    if isinstance(error, OSError):
        reason = error.strerror or str(error)
    elif "Os {" in str(error):
        reason = str(error)
    else:
        return None
    return BitplanError(f"writing {path} failed: {reason}. Nothing there was replaced and finished work is kept: "
                        "free space (or fix the folder) and run the same command again to resume")


def check_writable(path: str | os.PathLike, kind: str = "file", what: str | None = None) -> Path:
    """Refuse, before any work, an output path that cannot be written: a `kind` "file" that is a folder, a
    "folder" that is a file, or a path under something that is not a folder (`/dev/null/x`) or not writable.
    Long jobs call it first, so that a bad path costs a second rather than the whole run's results."""
    from .errors import BitplanError

    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be 'file' or 'folder', got {kind!r}")
    path = Path(path)
    what = what or f"output {kind}"
    if kind == "file" and path.is_dir():
        raise BitplanError(f"{what} {path} is a folder; give a file name")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise BitplanError(f"{what} {path} is a file, not a folder")
    # the folder that the path or its missing parents would be created in
    base = path if kind == "folder" and path.is_dir() else path.parent
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise BitplanError(f"cannot write {what} {path}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BitplanError(f"cannot write {what} {path}: no permission to write in {base}")
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON with a one-line error for a missing or malformed file."""
    from .errors import BitplanError

    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise BitplanError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
