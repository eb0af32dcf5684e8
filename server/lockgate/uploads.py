"""RepositoryModelLoad with files: writing the uploaded model into a private directory.

Triton's ``file:<path>`` load parameters carry a model's files. They are
written, under a fresh ``mkdtemp`` directory readable by the server only, into
``<tmp>/<model>/``; paths that would leave that directory are refused before
anything is written. The directory is removed when the model is unloaded or
replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from lockgate.errors import InvalidInputError, clip

#: Upper bound on the bytes one RepositoryModelLoad may write to disk.
MAX_LOAD_FILE_BYTES = 2**31 - 1
#: Upload paths (``file:`` load parameters): a model directory is shallow.
MAX_UPLOAD_PATH_CHARS = 1024
MAX_UPLOAD_PATH_DEPTH = 16


def remove_scratch(model_dir: Path) -> None:
    """Delete a directory made by ``write_model_files``, with its private parent."""
    shutil.rmtree(model_dir.parent, ignore_errors=True)


def write_model_files(name: str, files: dict[str, bytes]) -> Path:
    """Write RepositoryModelLoad ``file:`` payloads into a fresh model directory.

    Paths are relative to the model directory; absolute paths, ``..`` and
    anything that resolves outside it are refused before anything is written.
    """
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise InvalidInputError(f"invalid model name {clip(name)!r}")
    total = sum(len(b) for b in files.values())
    if total > MAX_LOAD_FILE_BYTES:
        raise InvalidInputError(
            f"model files total {total} bytes, over the limit of {MAX_LOAD_FILE_BYTES}"
        )
    root = Path(tempfile.mkdtemp(prefix="lockgate-load-"))
    model_dir = root / name
    relative = ""
    try:
        model_dir.mkdir()
        for relative, content in files.items():
            target = _safe_path(model_dir, relative)
            target.parent.mkdir(parents=True, exist_ok=True)
            # O_EXCL + O_NOFOLLOW: never write through a link planted earlier.
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
    except OSError as exc:  # a path that is both a file and a directory, too long...
        shutil.rmtree(root, ignore_errors=True)
        raise InvalidInputError(
            f"cannot write model file {clip(relative)!r}: {exc.strerror or exc}"
        ) from None
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return model_dir


def _safe_path(model_dir: Path, relative: str) -> Path:
    if len(relative) > MAX_UPLOAD_PATH_CHARS or relative.count("/") >= MAX_UPLOAD_PATH_DEPTH:
        # Before PurePosixPath and mkdir: thousands of levels exhaust recursion.
        raise InvalidInputError(
            f"file path {clip(relative)!r} is too long: at most {MAX_UPLOAD_PATH_CHARS} "
            f"characters and {MAX_UPLOAD_PATH_DEPTH} levels"
        )
    pure = PurePosixPath(relative)
    if (
        not pure.parts
        or pure.is_absolute()
        or ".." in pure.parts
        or "\\" in relative
        or "\0" in relative
    ):
        raise InvalidInputError(
            f"file path {clip(relative)!r} must be relative to the model directory, without '..'"
        )
    target = model_dir.joinpath(*pure.parts)
    if not target.resolve().is_relative_to(model_dir.resolve()):
        raise InvalidInputError(f"file path {clip(relative)!r} leaves the model directory")
    return target
