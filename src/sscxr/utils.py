"""Small helpers with no better home: stable seed derivation and atomic file writes."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that is a stable function of integers (seed, epoch, index, ...).

    Python's `hash` is salted per process, so a cryptographic hash is used: the same parts give the same
    seed on every machine and in every worker process.
    """
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator_for(*parts: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `derive_seed(*parts)`."""
    return torch.Generator().manual_seed(derive_seed(*parts))


@contextmanager
def atomic_open(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside `path` for binary writing; it replaces `path` when the block ends.

    Readers see the old file or the new one, never half of it: the data is written and fsynced to a
    temporary file in the same folder, then moved over `path` with `os.replace` (atomic on one file
    system). If the block raises, the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file 0600; give it the permissions a plain open() would (0666 - umask).
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never half of it."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Text version of `atomic_write_bytes` (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def display_path(path: str | os.PathLike[str]) -> str:
    """A path as written into reports and result files a user may share: relative to the working
    folder when it lies inside it (how a user gives paths to `sscxr`), else as it is.

    Keeps the user's machine layout (home folder, user name) out of shared outputs; resume keys and
    files the project reads back keep their resolved paths.
    """
    absolute = Path(os.path.abspath(path))
    try:
        return str(absolute.relative_to(Path.cwd()))
    except ValueError:
        return str(path)
