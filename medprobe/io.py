"""File helpers every stage shares: checksums, atomic writes, HDF5 string arrays.

A stage never leaves a half-written output behind: it writes a temporary file next to the final one and
renames it into place (``os.replace`` is atomic on one file system), so Snakemake never mistakes a file
from a killed job for a finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 1 << 20


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (``sha256`` or ``md5``), read in 1 MB chunks."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    return file_digest(path, "sha256")


def temporary_path(final: str | os.PathLike) -> Path:
    """A hidden sibling of ``final`` that only this process writes (``.name.tmp-<pid>``)."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final``, on failure it is removed.

    ``with atomic_path(out) as tmp: h5py.File(tmp, "w") ...``
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``final`` atomically."""
    with atomic_path(final) as tmp:
        tmp.write_text(text)


def decode_strings(values: Any) -> list[str]:
    """HDF5 string data (bytes or str, scalar or array) as a list of Python strings."""
    if isinstance(values, (str, bytes)):
        values = [values]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in np.asarray(values).tolist()]


def write_strings(group: Any, name: str, values: Sequence[str] | Iterable[str]) -> None:
    """A UTF-8 variable-length string dataset ``name`` in an h5py group or file."""
    import h5py

    group.create_dataset(name, data=np.array(list(values), dtype=object), dtype=h5py.string_dtype("utf-8"))


def listed_files_digest(table_csv: str | os.PathLike, base: str | os.PathLike, column: str = "file") -> str:
    """SHA-256 of the name, size and modification time of every existing file that ``table_csv``'s ``column``
    names (relative to ``base`` unless absolute): a rule param that changes when one of them is added, removed
    or replaced, at the cost of one ``stat`` per file. A table that cannot be read gives a digest of its error
    (its reader reports it properly)."""
    import csv

    digest = hashlib.sha256()
    try:
        with open(table_csv, newline="", encoding="utf-8-sig") as handle:
            names = [row.get(column) or "" for row in csv.DictReader(handle)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        return f"unreadable: {type(error).__name__}"
    for name in sorted(set(names)):
        path = Path(name) if os.path.isabs(name) else Path(base) / name
        try:
            stat = path.stat()
        except OSError:
            digest.update(f"{name}\0missing\n".encode())
            continue
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()
