"""Find every damaged result file at once, without recomputing anything: ``python -m medprobe.verify``.

After a crash, a full disk or a copy between clusters, a result file can exist and still be damaged (an HDF5
file cut short, a table without its last rows). Snakemake counts such a file as complete and never rebuilds
it; the job that reads it stops with :class:`DamagedFileError`, one file at a time. This command checks every
file under ``results/`` against its contract (docs/architecture.md) and against what was recorded about it:

* manifests: a CSV with every row complete, the manifest's columns, unique ids, known splits, and rows per
  split equal to its sidecar's ``counts``; sidecars: JSON with ``counts``
* activations (and shard) files: open, ``ids``, ``activations`` (N, L, D) for the L ``layer_names``,
  ``embeddings``, int8 ``scales``; ids equal to the manifest's, ``manifest_sha256`` equal to the manifest's
* probe outputs: ``predictions.h5``, ``layers.h5``, ``efficiency.h5`` open and have their datasets, attributes
  and shapes, test ids equal to the manifest's test split; ``probe.json`` parses, names layers that
  ``layers.h5`` holds, agrees with ``predictions.h5``, and its ``manifest_sha256`` is the manifest's
* tables (evaluation, collected, summaries, NEJM): every row complete and the table's columns; figures: PNG
  decodes, PDF complete; NEJM answers: one JSON object per line
* every file whose SHA-256 Snakemake recorded when a later job read it (``.snakemake/metadata``: inputs up
  to 1 MB) still has that SHA-256, unless Snakemake has rewritten the file since

It prints one line per damaged file with the command that deletes and rebuilds it, a summary, and exits with
status 1 when anything is damaged. ``--read-data`` also reads every value of the HDF5 files (slow for large
activations files; finds damaged chunks inside a file that opens). ``snakemake verify`` runs it as a job.
"""

from __future__ import annotations

import argparse
import base64
import csv
import dataclasses
import io
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
from PIL import Image

from medprobe.contracts import (
    PROBE_OUTPUT,
    SNAKEMAKE,
    DamagedFileError,
    open_hdf5,
    open_probe_output,
    read_dataset,
    read_json,
    rebuild_command,
)
from medprobe.extract.files import ACTIVATIONS, check_layout, check_manifest_match, read_layer
from medprobe.extract.merge import SHARD, _check_ids, _read_shard
from medprobe.io import decode_strings, sha256_file
from medprobe.labels import load_manifest
from medprobe.layers import EMBEDDINGS_LAYER
from medprobe.nejm.table import TABLE_COLUMNS as NEJM_COLUMNS
from medprobe.nejm.table import UNPARSEABLE_COLUMNS
from medprobe.summaries import EFFICIENCY_RETAINED_COLUMNS, EFFICIENCY_SUMMARY_COLUMNS, FINDINGS_COLUMNS
from medprobe.tables import COMPARISON_COLUMNS, TABLE_COLUMNS

__all__ = ["Damage", "DamagedFileError", "Report", "main", "snakemake_options", "snakemake_records", "verify"]

RESULTS = "results"
# Files that are not results: images (extraction reads and checks each one), files being written or left by a
# killed job (``.partial``, hidden ``.<name>.tmp-<pid>``) and the NEJM answer cache (its torn last line is allowed).
_NOT_RESULTS = re.compile(r"^results/images/|\.partial$|(^|/)\.[^/]*$|\.cache\.jsonl$")

_TABLES = {
    "metrics": TABLE_COLUMNS,
    "efficiency": TABLE_COLUMNS,
    "groups": [*TABLE_COLUMNS, "group"],
    "layers": [*TABLE_COLUMNS, "authors_layer"],
    "comparisons": COMPARISON_COLUMNS,
    "efficiency_summary": EFFICIENCY_SUMMARY_COLUMNS,
    "efficiency_retained": EFFICIENCY_RETAINED_COLUMNS,
    "findings": FINDINGS_COLUMNS,
    "nejm": NEJM_COLUMNS,
    "nejm_unparseable": UNPARSEABLE_COLUMNS,
}


@dataclasses.dataclass(frozen=True)
class Damage:
    """A damaged file (``path`` relative to the working directory), what it is and what is wrong; ``target`` is the
    file Snakemake rebuilds (the file itself, or the activations file of a shard)."""

    path: str
    what: str
    problem: str
    target: str


@dataclasses.dataclass
class Report:
    """What :func:`verify` found: files checked, damaged and left unchecked (with why)."""

    directory: Path
    options: list[str]
    checked: list[str] = dataclasses.field(default_factory=list)
    damaged: list[Damage] = dataclasses.field(default_factory=list)
    unchecked: list[str] = dataclasses.field(default_factory=list)
    skipped: int = 0

    def _on_disk(self, path: str) -> str:
        return path if self.directory == Path(".") else os.fspath(self.directory / path)

    def command(self, damage: Damage) -> str:
        """The command that deletes and rebuilds ``damage``, run from the workflow's folder."""
        return rebuild_command(self._on_disk(damage.path), damage.target, self.options)

    def rebuild_all(self) -> str:
        """One command that deletes every damaged file and rebuilds them all."""
        removed = shlex.join(self._on_disk(damage.path) for damage in self.damaged)
        targets = list(dict.fromkeys(damage.target for damage in self.damaged))
        return f"rm {removed} && {shlex.join([*SNAKEMAKE.split(), *self.options, *targets])}"

    def lines(self) -> list[str]:
        lines = [f"DAMAGED {d.path} ({d.what}): {d.problem} | fix: {self.command(d)}" for d in self.damaged]
        where = self.directory / RESULTS
        summary = f"verify: {len(self.checked)} file(s) under {where} checked, {len(self.damaged)} damaged"
        if self.unchecked:
            summary += f"; {len(self.unchecked)} of no known kind not checked ({', '.join(self.unchecked[:3])}"
            summary += ", ...)" if len(self.unchecked) > 3 else ")"
        if self.skipped:
            summary += f"; {self.skipped} image(s), partial or temporary file(s) skipped"
        lines.append(summary)
        if len(self.damaged) > 1:
            lines.append(f"rebuild them all: {self.rebuild_all()}")
        return lines


def snakemake_records(directory: Path) -> dict[str, dict[str, Any]]:
    """Snakemake's metadata records of ``directory`` (``.snakemake/metadata``, its file persistence: one JSON file
    per output, named by the output path in URL-safe base64, split into ``@``-prefixed folders when long), by
    output path. Files that do not decode are left out; no folder gives no records."""
    root = directory / ".snakemake" / "metadata"
    records: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return records
    for file in root.rglob("*"):
        if not file.is_file():
            continue
        name = "".join(part.removeprefix("@") for part in file.relative_to(root).parts)
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
            key = base64.urlsafe_b64decode(name).decode("utf-8")
        except (ValueError, OSError):
            continue
        if isinstance(record, dict):
            records[key] = record
    return records


def _recorded_checksums(records: dict[str, dict[str, Any]]) -> dict[str, list[tuple[float, str, str]]]:
    """Per input path: ``(starttime, sha256 hex, the reading job's output)`` of every complete record."""
    recorded: dict[str, list[tuple[float, str, str]]] = {}
    for output, record in records.items():
        if record.get("incomplete") or not isinstance(record.get("input_checksums"), dict):
            continue
        for path, checksum in record["input_checksums"].items():
            algorithm, _, digest = str(checksum).rpartition(":")
            if algorithm in ("", "sha256") and record.get("starttime") is not None:
                recorded.setdefault(path, []).append((float(record["starttime"]), digest, output))
    return recorded


@dataclasses.dataclass(frozen=True)
class _Manifest:
    path: Path
    ids: list[str]
    test_ids: list[str]
    sha256: str


class _Verifier:
    """Checks the files of one working directory in the order the workflow makes them, so that a file is compared
    only with intact files it depends on (a damaged manifest is reported once, not by everything after it)."""

    def __init__(self, directory: Path, read_data: bool) -> None:
        self.directory, self.read_data = directory, read_data
        self.records = snakemake_records(directory)
        self.recorded = _recorded_checksums(self.records)
        self.intact: set[str] = set()
        self.damaged: list[Damage] = []
        self.manifests: dict[str, _Manifest] = {}

    def path(self, relative: str) -> Path:
        return self.directory / relative

    def relative(self, path: str | os.PathLike) -> str:
        path = Path(path)
        try:
            return path.relative_to(self.directory).as_posix()
        except ValueError:
            return path.as_posix()

    def intact_file(self, relative: str) -> Path | None:
        """``relative`` when it exists and was found intact (checked before the files that depend on it)."""
        return self.path(relative) if relative in self.intact else None

    def check(self, relative: str, kind: _Kind, match: re.Match) -> None:
        """Check one file of ``kind``; a damaged one is added to :attr:`damaged`, an intact one to :attr:`intact`."""
        try:
            kind.checker(self, relative, match)
            self.check_recorded_checksum(relative, kind.what)
        except DamagedFileError as error:
            self.damaged.append(Damage(relative, error.what, error.problem, self.relative(error.target)))
        except PermissionError:
            raise
        except OSError as error:  # data HDF5 cannot read, a file that vanished while being checked
            self.damaged.append(Damage(relative, kind.what, f"cannot be read ({error})", relative))
        else:
            self.intact.add(relative)

    def check_recorded_checksum(self, relative: str, what: str) -> None:
        """The file's SHA-256 is the one Snakemake recorded when a later job read it, unless Snakemake has written
        the file since (its own record's ``endtime``, the file's mtime when its job ended, is after that job's start)."""
        own = self.records.get(relative)
        if own is None or own.get("endtime") is None or relative not in self.recorded:
            return
        readers = [entry for entry in self.recorded[relative] if entry[0] >= float(own["endtime"])]
        if not readers:
            return
        _, digest, reader = max(readers)
        if sha256_file(self.path(relative)) != digest:
            raise DamagedFileError(
                self.path(relative),
                f"its SHA-256 differs from the one Snakemake recorded when the job making {reader} read it (the "
                "file changed after Snakemake wrote it)",
                what=what,
            )

    # --------------------------------------------------------------------------------------------- manifests
    def sidecar(self, relative: str, match: re.Match) -> None:
        read_json(self.path(relative), "manifest sidecar", keys=("counts",))

    def manifest(self, relative: str, match: re.Match) -> None:
        path = self.path(relative)
        _check_csv(path, "manifest", ())
        manifest = load_manifest(path)
        sidecar = self.intact_file(f"{RESULTS}/manifests/{match['task']}.json")
        if sidecar is None:
            return
        counts = json.loads(sidecar.read_text(encoding="utf-8"))["counts"]
        expected = {split: int(entry.get("images", -1)) for split, entry in counts.items() if isinstance(entry, dict)}
        found = {str(split): int(n) for split, n in manifest["split"].value_counts().items()}
        if found != expected:
            raise DamagedFileError(
                path,
                f"rows per split {dict(sorted(found.items()))} differ from its sidecar {sidecar.name}'s counts "
                f"{dict(sorted(expected.items()))}",
                what="manifest",
            )

    def task_manifest(self, task: str) -> _Manifest | None:
        """The intact manifest of ``task``, or None (missing or damaged: nothing is compared with it)."""
        path = self.intact_file(f"{RESULTS}/manifests/{task}.csv")
        if path is None:
            return None
        if task not in self.manifests:
            table = load_manifest(path)
            test_ids = table["image_id"][table["split"] == "test"].tolist()
            self.manifests[task] = _Manifest(path, table["image_id"].tolist(), test_ids, sha256_file(path))
        return self.manifests[task]

    # ------------------------------------------------------------------------------------------- activations
    def activations(self, relative: str, match: re.Match) -> None:
        with open_hdf5(self.path(relative), ACTIVATIONS) as handle:
            names = check_layout(handle)
            manifest = self.task_manifest(match["task"])
            if manifest is not None:
                check_manifest_match(handle, manifest.ids, manifest.path, manifest.sha256)
            if self.read_data:
                for index, name in enumerate(names):
                    read_layer(handle, index, name == EMBEDDINGS_LAYER)

    def shard(self, relative: str, match: re.Match) -> None:
        # merge_shards' own checks of one shard: layout and shard attributes, then its rows of the manifest
        shard = _read_shard(self.path(relative))
        manifest = self.task_manifest(match["task"])
        if manifest is not None:
            _check_ids(shard, manifest.ids, manifest.path)

    # ------------------------------------------------------------------------------------------------ probes
    def probe_output(self, relative: str, match: re.Match) -> None:
        output = match["output"]
        with open_probe_output(self.path(relative), output) as (handle, ids):
            read_dataset(handle, PROBE_OUTPUT, "probabilities")  # small: every value is read
            manifest = self.task_manifest(match["task"])
            if manifest is not None and ids != manifest.test_ids:
                raise DamagedFileError(
                    handle.filename,
                    f"its {len(ids)} ids are not the {len(manifest.test_ids)} test images of {manifest.path} in "
                    "manifest order",
                    what=PROBE_OUTPUT,
                )

    def probe_summary(self, relative: str, match: re.Match) -> None:
        path = self.path(relative)
        summary = read_json(path, "probe summary", keys=("layer", "layers", "classes", "n_train"))
        names = [entry.get("name") if isinstance(entry, dict) else None for entry in summary["layers"]]
        problems = []
        folder = Path(relative).parent.as_posix()
        layers = self.intact_file(f"{folder}/layers.h5")
        if layers is None:
            if summary["layer"] not in names:
                problems.append(f"its layer {summary['layer']!r} is not among its layers {names}")
        else:
            with h5py.File(layers, "r") as handle:
                stored = decode_strings(handle.attrs["layer_names"])
                classes = decode_strings(handle.attrs["classes"])
            if summary["layer"] not in stored:
                problems.append(f"its layer {summary['layer']!r} is not in layers.h5, whose layer_names are {stored}")
            elif names != stored:
                problems.append(f"its layers {names} are not layers.h5's layer_names {stored}")
            if list(summary["classes"]) != classes:
                problems.append(f"its classes {summary['classes']} are not layers.h5's {classes}")
        predictions = self.intact_file(f"{folder}/predictions.h5")
        if predictions is not None:
            with h5py.File(predictions, "r") as handle:
                layer = handle.attrs.get("layer")
            if layer is not None and decode_strings(layer)[0] != summary["layer"]:
                problems.append(f"its layer {summary['layer']!r} is not predictions.h5's {decode_strings(layer)[0]!r}")
        manifest = self.task_manifest(match["task"])
        if manifest is not None and summary.get("manifest_sha256", manifest.sha256) != manifest.sha256:
            problems.append(
                f"written for a different manifest (its manifest_sha256 {summary['manifest_sha256']!r}, "
                f"{manifest.path} hashes to {manifest.sha256!r})"
            )
        if problems:
            raise DamagedFileError(path, "; ".join(problems), what="probe summary")

    # ------------------------------------------------------------------------------- tables, figures, NEJM
    def evaluation_table(self, relative: str, match: re.Match) -> None:
        """A table of one evaluate or compare job (always with its header)."""
        _check_csv(self.path(relative), "result table", _TABLES[match["table"]])

    def table(self, relative: str, match: re.Match) -> None:
        """A table under results/tables: its columns when the name is known; a collected table with no rows at all
        is an empty file of one line break (medprobe.tables.collect)."""
        columns = TABLE_COLUMNS if match["folder"] else _TABLES.get(match["table"], ())
        _check_csv(self.path(relative), "result table", columns, allow_empty=True)

    def figure(self, relative: str, match: re.Match) -> None:
        path = self.path(relative)
        if match["format"] == "png":
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, SyntaxError, ValueError) as error:
                raise DamagedFileError(path, f"not a readable PNG image ({error})", what="figure") from error
            return
        data = path.read_bytes()
        if not data.startswith(b"%PDF-") or b"%%EOF" not in data[-2048:]:
            raise DamagedFileError(path, "not a complete PDF (no %PDF- header or no %%EOF at its end)", what="figure")

    def answers(self, relative: str, match: re.Match) -> None:
        path = self.path(relative)
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            raise DamagedFileError(path, "its last line is cut short (no line break)", what="NEJM answers")
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DamagedFileError(
                    path, f"line {number} is not valid JSON ({error})", what="NEJM answers"
                ) from None
            if not isinstance(record, dict):
                raise DamagedFileError(path, f"line {number} is not a JSON object", what="NEJM answers")


@dataclasses.dataclass(frozen=True)
class _Kind:
    """A kind of result file: its path (relative to the working directory), its check, and its name in messages."""

    pattern: re.Pattern
    checker: Callable[[_Verifier, str, re.Match], None]
    what: str


def _kind(pattern: str, checker: Callable[[_Verifier, str, re.Match], None], what: str) -> _Kind:
    return _Kind(re.compile(pattern), checker, what)


# The result files, in the order the workflow makes them (files are compared only with those checked before them).
_KINDS = [
    _kind(r"results/manifests/(?P<task>[^/]+)\.json", _Verifier.sidecar, "manifest sidecar"),
    _kind(r"results/manifests/(?P<task>[^/]+)\.csv", _Verifier.manifest, "manifest"),
    _kind(r"results/activations/[^/]+/(?P<task>[^/]+)\.h5", _Verifier.activations, ACTIVATIONS),
    _kind(r"results/activations/[^/]+/(?P<task>[^/]+)\.shards/\d+\.h5", _Verifier.shard, SHARD),
    _kind(
        r"results/probes/[^/]+/(?P<task>[^/]+)/(?P<output>predictions|layers|efficiency)\.h5",
        _Verifier.probe_output,
        PROBE_OUTPUT,
    ),
    _kind(r"results/probes/[^/]+/(?P<task>[^/]+)/probe\.json", _Verifier.probe_summary, "probe summary"),
    _kind(r"results/evaluation/(?P<table>comparisons)/[^/]+\.csv", _Verifier.evaluation_table, "result table"),
    _kind(
        r"results/evaluation/[^/]+/[^/]+/(?P<table>metrics|groups|layers|efficiency)\.csv",
        _Verifier.evaluation_table,
        "result table",
    ),
    _kind(r"results/tables/(?P<folder>by_task/|by_model/)?(?P<table>[^/]+)\.csv", _Verifier.table, "result table"),
    _kind(r"results/figures/[^/]+\.(?P<format>png|pdf)", _Verifier.figure, "figure"),
    _kind(r"results/nejm/[^/]+/answers\.jsonl", _Verifier.answers, "NEJM answers"),
]


def _check_csv(path: Path, what: str, columns: Iterable[str], *, allow_empty: bool = False) -> None:
    """A CSV written whole: UTF-8, ending in a line break, every row with as many fields as the header, and the
    ``columns`` in the header (``allow_empty``: a file of one line break is a table without columns or rows)."""
    data = path.read_bytes()
    if allow_empty and data == b"\n":
        return
    if not data:
        raise DamagedFileError(path, "is empty (0 bytes)", what=what)
    if not data.endswith(b"\n"):
        raise DamagedFileError(path, "its last line is cut short (no line break at the end)", what=what)
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8"), newline=""))
        header = next(reader)
        for row in reader:
            if len(row) != len(header):
                raise DamagedFileError(
                    path, f"line {reader.line_num} has {len(row)} field(s), the header {len(header)}", what=what
                )
    except (UnicodeDecodeError, csv.Error) as error:
        raise DamagedFileError(path, f"not a readable CSV table ({error})", what=what) from error
    missing = [column for column in columns if column not in header]
    if missing:
        raise DamagedFileError(path, f"missing column(s) {missing}; its columns are {header}", what=what)


def _kind_of(relative: str) -> tuple[int, re.Match] | None:
    """The position in :data:`_KINDS` of the kind of file ``relative`` is, and its match; None for no known kind."""
    for position, kind in enumerate(_KINDS):
        match = kind.pattern.fullmatch(relative)
        if match:
            return position, match
    return None


def verify(
    directory: str | os.PathLike = ".", *, configfiles: Sequence[str | os.PathLike] = (), read_data: bool = False
) -> Report:
    """Check every file under ``<directory>/results`` (module docstring); ``configfiles`` go into the rebuild
    commands (``--configfile``), as does ``--directory`` when ``directory`` is not the current folder."""
    directory = Path(directory)
    options = ["--configfile", *map(os.fspath, configfiles)] if configfiles else []
    if directory != Path("."):
        options = ["--directory", os.fspath(directory), *options]
    report = Report(directory, options)
    files = sorted(
        path.relative_to(directory).as_posix() for path in (directory / RESULTS).rglob("*") if path.is_file()
    )
    kinds = []
    for relative in files:
        if _NOT_RESULTS.search(relative):
            report.skipped += 1
        elif (kind := _kind_of(relative)) is None:
            report.unchecked.append(relative)
        else:
            kinds.append((kind[0], relative, kind[1]))
    verifier = _Verifier(directory, read_data)
    for position, relative, match in sorted(kinds, key=lambda kind: kind[:2]):
        verifier.check(relative, _KINDS[position], match)
        report.checked.append(relative)
    report.damaged = verifier.damaged
    return report


def snakemake_options(
    workdir: str | os.PathLike, workflow_dir: str | os.PathLike, configfiles: Iterable[str | os.PathLike]
) -> list[str]:
    """The verify options of a Snakemake run (rule ``verify``): ``--directory`` when its working directory is not the
    workflow's folder, and its ``--configfile`` files but the default one (``config/config.yaml``, which the default
    profile gives), so that the printed commands rebuild into the same place with the same config."""
    options: list[str] = []
    if os.path.realpath(workdir) != os.path.realpath(workflow_dir):
        options += ["--directory", os.fspath(workdir)]
    default = os.path.realpath(Path(workflow_dir) / "config" / "config.yaml")
    configfiles = [os.fspath(path) for path in configfiles if os.path.realpath(path) != default]
    return options + (["--configfile", *configfiles] if configfiles else [])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medprobe.verify",
        description="Check every result file under DIR/results against its contract and the checksums recorded "
        "about it, without recomputing anything; print each damaged file with the command that rebuilds it.",
    )
    parser.add_argument("--directory", "-d", default=".", help="the workflow's working directory (default: .)")
    parser.add_argument(
        "--configfile",
        nargs="+",
        action="extend",
        default=[],
        help="the config file(s) of the run, as given to snakemake (they go into the rebuild commands)",
    )
    parser.add_argument(
        "--read-data", action="store_true", help="also read every value of every HDF5 file (slow for activations)"
    )
    args = parser.parse_args(argv)
    if not (Path(args.directory) / RESULTS).is_dir():
        parser.error(f"{Path(args.directory) / RESULTS} is not a folder: nothing to verify")
    for configfile in args.configfile:
        if not Path(configfile).is_file():
            parser.error(f"--configfile {configfile} does not exist")
    report = verify(args.directory, configfiles=args.configfile, read_data=args.read_data)
    print("\n".join(report.lines()))
    return 1 if report.damaged else 0


if __name__ == "__main__":
    sys.exit(main())
