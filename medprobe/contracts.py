"""Damaged intermediate files: one error, one message and one remedy for every reader of a result file.

A result file that exists but does not meet its contract (docs/architecture.md) — an HDF5 file that does not
open because an interrupted copy or a full disk truncated it, a missing dataset or attribute, a wrong shape, ids
that are not its manifest's — still counts as complete for Snakemake, so every rerun would stop on it the same
way. Every reader raises :class:`DamagedFileError` for it, with a message that names the file, what is wrong and
the command that deletes and rebuilds it (:func:`rebuild_command`); ``python -m medprobe.verify`` checks every
result file at once and prints the same problems and commands.

This module holds the error, the safe openers (:func:`open_hdf5`, :func:`read_json`, :func:`read_dataset`) and
the contracts of the probe outputs (:func:`check_probe_output`); it imports no medprobe module but ``medprobe.io``,
so every reader can use it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from medprobe.io import decode_strings

__all__ = [
    "check_result_files",
    "PROBE_OUTPUT",
    "PROBE_OUTPUTS",
    "DamagedFileError",
    "check_probe_output",
    "check_shape",
    "open_hdf5",
    "open_probe_output",
    "read_dataset",
    "read_json",
    "rebuild_command",
    "require",
]

SNAKEMAKE = "snakemake --cores all"


def rebuild_command(
    path: str | os.PathLike, target: str | os.PathLike | None = None, options: Sequence[str] = ()
) -> str:
    """``rm <path> && snakemake --cores all [options] <target>``: delete a damaged file and rebuild ``target`` (the
    file itself unless another file rebuilds it, e.g. the activations file for a damaged shard)."""
    target = path if target is None else target
    words = [*SNAKEMAKE.split(), *options, os.fspath(target)]
    return f"rm {shlex.quote(os.fspath(path))} && {shlex.join(words)}"


class DamagedFileError(ValueError):
    """A result file that exists but breaks its contract: it does not open, lacks a dataset, attribute or key, has
    a wrong shape, or ids that do not match its manifest.

    The message is ``<what> <path>: <problem>.`` followed by the remedy, the exact command that deletes the file and
    rebuilds it (:func:`rebuild_command`, :attr:`command`); :attr:`target` is what Snakemake is asked to rebuild.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        problem: str,
        *,
        what: str = "file",
        target: str | os.PathLike | None = None,
        options: Sequence[str] = (),
    ) -> None:
        self.path, self.problem, self.what = os.fspath(path), problem, what
        self.target = self.path if target is None else os.fspath(target)
        self.command = rebuild_command(self.path, self.target, options)
        super().__init__(
            f"{what} {self.path}: {problem}. Snakemake counts the file as complete, so every rerun stops here "
            f"the same way: delete it and rebuild it with `{self.command}` (with the --configfile and --directory "
            "options of your run); `python -m medprobe.verify` lists every damaged file"
        )


def open_hdf5(
    path: str | os.PathLike, what: str, *, target: str | os.PathLike | None = None, **options: Any
) -> h5py.File:
    """``path`` opened read-only (``options`` go to :class:`h5py.File`); a file that exists but is no readable HDF5
    file (truncated, overwritten, not HDF5) raises :class:`DamagedFileError`. A missing file raises
    ``FileNotFoundError``; permission and file-locking errors are raised as they are (the file is not damaged)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return h5py.File(path, "r", **options)
    except PermissionError:
        raise
    except OSError as error:
        if "unable to lock file" in str(error).lower():  # another process holds it (HDF5 file locking)
            raise
        raise DamagedFileError(path, f"not a readable HDF5 file ({error})", what=what, target=target) from error


def require(
    handle: h5py.File,
    what: str,
    *,
    datasets: Iterable[str] = (),
    attrs: Iterable[str] = (),
    target: str | os.PathLike | None = None,
) -> None:
    """Raise :class:`DamagedFileError` naming every dataset and attribute of the contract that ``handle`` lacks."""
    missing = [f"dataset {name!r}" for name in datasets if name not in handle]
    missing += [f"attribute {name!r}" for name in attrs if name not in handle.attrs]
    if missing:
        raise DamagedFileError(handle.filename, f"missing {', '.join(missing)}", what=what, target=target)


def check_shape(
    handle: h5py.File,
    what: str,
    name: str,
    expected: Sequence[int | None],
    meaning: str,
    *,
    target: str | os.PathLike | None = None,
) -> tuple[int, ...]:
    """The shape of dataset ``name``, which must be ``expected`` (``None``: any size); ``meaning`` says what the
    expected sizes are, for the message."""
    shape = tuple(handle[name].shape)
    if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
        sizes = ", ".join("any" if e is None else str(e) for e in expected)
        wanted = f"({sizes},)" if len(expected) == 1 else f"({sizes})"
        raise DamagedFileError(
            handle.filename, f"{name!r} has shape {shape}, expected {wanted} ({meaning})", what=what, target=target
        )
    return shape


def read_dataset(
    handle: h5py.File, what: str, name: str, selection: Any = (), *, target: str | os.PathLike | None = None
) -> np.ndarray:
    """``handle[name][selection]``; data HDF5 cannot read (a damaged chunk) raises :class:`DamagedFileError`."""
    try:
        return handle[name][selection]
    except OSError as error:
        raise DamagedFileError(
            handle.filename, f"dataset {name!r} cannot be read ({error})", what=what, target=target
        ) from error


def read_json(
    path: str | os.PathLike, what: str, *, keys: Iterable[str] = (), target: str | os.PathLike | None = None
) -> dict[str, Any]:
    """A JSON object file with ``keys``; text that is not a JSON object (e.g. cut short) or lacks a key raises
    :class:`DamagedFileError`. A missing file raises ``FileNotFoundError``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(path, f"not valid JSON ({error})", what=what, target=target) from error
    if not isinstance(content, dict):
        raise DamagedFileError(path, f"holds a JSON {type(content).__name__}, not an object", what=what, target=target)
    missing = [key for key in keys if key not in content]
    if missing:
        raise DamagedFileError(path, f"missing key(s) {missing}", what=what, target=target)
    return content


# What a damaged probe output is called in messages.
PROBE_OUTPUT = "probe output"
# The probe outputs (docs/architecture.md, "Probes"): the datasets and attributes their readers need, and the
# dimensions that come before (N test images, C classes) in ``probabilities``: layers (L', from ``layer_names``),
# fractions x seeds.
PROBE_OUTPUTS: dict[str, dict[str, tuple[str, ...]]] = {
    "predictions": {"datasets": ("ids", "probabilities"), "attrs": ("classes",), "leading": ()},
    "layers": {"datasets": ("ids", "probabilities"), "attrs": ("layer_names", "classes"), "leading": ("layer_names",)},
    "efficiency": {
        "datasets": ("ids", "probabilities", "n_train"),
        "attrs": ("fractions", "seeds", "classes"),
        "leading": ("fractions", "seeds"),
    },
}


def check_probe_output(handle: h5py.File, output: str) -> list[str]:
    """Check an open probe output (``predictions``, ``layers`` or ``efficiency``, :data:`PROBE_OUTPUTS`) against its
    contract: datasets and attributes present, ``probabilities`` of shape (leading..., N ids, C classes), ``n_train``
    (fractions, seeds), and ``val_score`` / ``C`` (one per layer) where present. Returns the ids."""
    what = PROBE_OUTPUT
    contract = PROBE_OUTPUTS[output]
    require(handle, what, datasets=contract["datasets"], attrs=contract["attrs"])
    check_shape(handle, what, "ids", (None,), "one id per test image")
    ids = decode_strings(read_dataset(handle, what, "ids"))
    leading = tuple(len(np.atleast_1d(handle.attrs[name])) for name in contract["leading"])
    classes = len(np.atleast_1d(handle.attrs["classes"]))
    meaning = " x ".join([*contract["leading"], "ids", "classes"])
    check_shape(handle, what, "probabilities", (*leading, len(ids), classes), meaning)
    if output == "efficiency":
        check_shape(handle, what, "n_train", leading, "fractions x seeds")
    for name in ("val_score", "C") if output == "layers" else ():
        if name in handle:
            check_shape(handle, what, name, leading, "one per layer_names")
    return ids


@contextlib.contextmanager
def open_probe_output(path: str | os.PathLike, output: str) -> Iterator[tuple[h5py.File, list[str]]]:
    """``(handle, ids)`` of the probe output ``output`` at ``path``, opened (:func:`open_hdf5`) and checked against
    its contract (:func:`check_probe_output`)."""
    with open_hdf5(path, PROBE_OUTPUT) as handle:
        yield handle, check_probe_output(handle, output)


def check_result_files(pairs: Iterable[tuple[str, str]], root: str | os.PathLike = ".") -> None:
    """Raise :class:`DamagedFileError` for the first existing activations file or probe output of the ``(model,
    task)`` pairs under ``root`` that does not open as HDF5 or lacks a dataset of its contract.

    The workflow calls it before any job (common.smk): a job reading such a file would fail only after Snakemake
    had deleted its outputs, and Snakemake counts the damaged file complete, so every rerun would fail the same
    way. Empty files (which ``snakemake --touch`` makes) are left to the jobs that read them;
    ``python -m medprobe.verify`` checks every file, contents included.
    """
    for model, task in pairs:
        contracts = [(f"results/activations/{model}/{task}.h5", "activations file", ("ids", "activations"))]
        contracts += [
            (f"results/probes/{model}/{task}/{name}", PROBE_OUTPUT, ("ids", "probabilities"))
            for name in ("predictions.h5", "layers.h5", "efficiency.h5")
        ]
        for relative, what, datasets in contracts:
            path = Path(root) / relative
            if path.is_file() and path.stat().st_size > 0:
                with open_hdf5(path, what) as handle:
                    require(handle, what, datasets=datasets)
