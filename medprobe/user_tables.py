"""Tables users write themselves: one reader and one set of rules for every one of them.

The workflow's own files (manifests, result tables, ``knees_all.csv``) are written by medprobe and read back with
pandas. Files a user writes by hand or exports from a spreadsheet go through this module instead, so that every
such file is read, normalised and reported the same way:

* a task's raw table ``metadata.csv`` (:mod:`medprobe.prepare`);
* T8's ``knees.csv`` and a ``landmarks.csv`` (:mod:`medprobe.datasets.oai_most.knees`,
  :func:`medprobe.kneel.read_landmarks`);
* the NEJM cases' ``case.json`` (:mod:`medprobe.nejm.cases`: :func:`read_text` and :func:`normalise_id`).

The rules (docs/reliability.md, "User tables"):

* **Encoding.** UTF-8, with or without a byte-order mark. Anything else stops with the file, the line and the
  byte where decoding failed, and how to convert the file (``iconv -f latin1 -t utf-8``).
* **Shape.** An empty file, a file without a header line and a header without rows each get their own message;
  missing columns are named; a row with more values than the header has columns is refused. Blank lines and rows
  whose every cell is empty (spreadsheets leave them at the end) are skipped; a row with fewer values than the
  header has the remaining cells empty.
* **Lines.** Rows are numbered as an editor numbers lines: the header is line 1 and a row is the line it starts
  on (a quoted cell may span lines). :func:`read_csv` returns the rows with these numbers as the index, and every
  message names the file, the line and the column: ``metadata.csv, line 7, column patient_id: ...``.
* **Identifiers** (ids, labels, partitions, sources, groups: every cell that is compared with another):
  surrounding whitespace stripped and Unicode NFC, so ``"José"``, ``"Jose\\u0301"`` and ``" José "`` are one
  patient. Control characters and invisible format characters (zero-width space, byte-order mark, direction
  marks) are refused: two ids that look the same must be the same.
* **File names**: surrounding whitespace stripped and otherwise opened exactly as written (a file system such as
  Linux's compares names byte for byte, so medprobe never rewrites them). Where a listed file does not exist but
  one whose name differs only in Unicode normal form or in letter case does, :class:`FileLookup` names both.
  Two rows naming one file (the same path, or the same file on disk through another spelling, a link or a
  case-insensitive file system) are found by :func:`same_file_groups`.
"""

from __future__ import annotations

import csv
import io
import os
import shlex
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd

__all__ = [
    "FileLookup",
    "UserTableError",
    "at",
    "bad_characters",
    "lines",
    "normalise_id",
    "read_csv",
    "read_text",
    "require_values",
    "same_file_groups",
]

SHOWN = 5  # offending rows listed in one message
CONVERT = "iconv -f latin1 -t utf-8 {path} > {path}.utf8 && mv {path}.utf8 {path}"


class UserTableError(ValueError):
    """A user's table cannot be used as written; the message names the file and, where there is one, the line
    and column."""


def at(path: str | Path, line: int | None = None, column: str | None = None) -> str:
    """``path, line N, column C``: where a message points."""
    place = str(path)
    if line is not None:
        place += f", line {line}"
    if column is not None:
        place += f", column {column}"
    return place


def normalise_id(value: str) -> str:
    """An identifier as medprobe compares it: Unicode NFC without surrounding whitespace."""
    return unicodedata.normalize("NFC", str(value)).strip()


def bad_characters(value: str) -> list[str]:
    """The control and invisible format characters of ``value`` (Unicode categories Cc, Cf, Zl, Zp), as
    ``U+XXXX`` names; empty when there are none."""
    if value.isprintable():
        return []
    return [f"U+{ord(char):04X}" for char in value if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp")]


# ---- text -----------------------------------------------------------------------------------------------------


def read_text(path: str | Path, what: str = "file") -> str:
    """The text of a user's file, which must be UTF-8 (a byte-order mark is allowed and dropped).

    Raises :class:`UserTableError` naming the file, the line and the byte where decoding failed, and how to
    convert the file; ``FileNotFoundError`` naming ``what`` when it does not exist."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: {what} not found") from None
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise UserTableError(
            f"{path}: the file is UTF-16 (it starts with a UTF-16 byte-order mark), but it must be UTF-8: save it "
            f"as UTF-8 ('CSV UTF-8' in a spreadsheet program) or convert it, e.g. "
            f"{CONVERT.replace('latin1', 'utf-16').format(path=shlex.quote(str(path)))}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        start = data.rfind(b"\n", 0, error.start) + 1
        end = data.find(b"\n", error.start)
        line_bytes = data[start : end if end >= 0 else len(data)].rstrip(b"\r")
        shown = line_bytes.decode("latin-1")
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        line = data.count(b"\n", 0, error.start) + 1
        command = CONVERT.format(path=shlex.quote(str(path)))
        raise UserTableError(
            f"{at(path, line)}, byte {error.start - start + 1} of the line "
            f"(byte {error.start + 1} of the file): {data[error.start : error.end].hex(' ')} is not UTF-8 "
            f"({error.reason}); the file must be UTF-8. Read as Latin-1 the line is {shown!r}. If that is what "
            f"it should say, convert the file: {command} (or save it as 'CSV UTF-8' in a spreadsheet program)"
        ) from None


# ---- tables -----------------------------------------------------------------------------------------------------


def read_csv(
    path: str | Path,
    required: Sequence[str],
    optional: Sequence[str] = (),
    *,
    identifiers: Sequence[str] = (),
    files: Sequence[str] = (),
    allow_no_rows: bool = False,
    what: str = "table",
) -> pd.DataFrame:
    """A user's CSV file as text cells, indexed by line number (index name ``line``), checked and normalised.

    ``required`` columns must be in the header (the message names those missing); ``optional`` ones are added,
    empty, when absent. Columns named in ``identifiers`` are normalised with :func:`normalise_id`, those in
    ``files`` only stripped; in both, control and format characters are refused, naming the line and column.
    Other columns are kept as written. ``allow_no_rows`` accepts a header without rows. Header names are
    stripped and NFC; columns with an empty name are dropped."""
    path = Path(path)
    text = read_text(path, what)
    columns_hint = ", ".join(required)
    if not text.strip():
        size = path.stat().st_size
        raise UserTableError(
            f"{path}: the file is empty ({size} byte{'s' if size != 1 else ''}{', only blank lines' if size else ''})"
            f"; a {what} is a CSV file whose first line names its columns ({columns_hint}) and whose every other "
            "line is one row"
        )
    header, header_line, rows, numbers = _records(path, text)
    missing = [column for column in required if column not in header]
    if missing:
        raise UserTableError(
            f"{at(path, header_line)}: missing column(s) {missing}; found {[c for c in header if c]} "
            f"(the first line must name the columns: {columns_hint})"
        )
    if not rows and not allow_no_rows:
        raise UserTableError(
            f"{path}: the file has a header (line {header_line}: {', '.join(c for c in header if c)}) but no rows"
        )
    keep = [index for index, name in enumerate(header) if name]
    table = pd.DataFrame(
        [[row[index] for index in keep] for row in rows],
        columns=[header[index] for index in keep],
        index=pd.Index(numbers, name="line", dtype=int),
        dtype=object,
    )
    for column in optional:
        if column not in table.columns:
            table[column] = ""
    for column in identifiers:
        if column in table.columns:
            table[column] = [normalise_id(value) for value in table[column]]
    for column in files:
        if column in table.columns:
            table[column] = [value.strip() for value in table[column]]
    check_characters(table, path, [c for c in (*identifiers, *files) if c in table.columns])
    return table


def _records(path: Path, text: str) -> tuple[list[str], int, list[list[str]], list[int]]:
    """(header names, header line, rows padded to the header's width, each row's first line)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    header_line = 0
    rows: list[list[str]] = []
    numbers: list[int] = []
    previous = 0
    try:
        for record in reader:
            first, previous = previous + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header, header_line = [unicodedata.normalize("NFC", name).strip() for name in record], first
                named = [name for name in header if name]
                repeated = sorted({name for name in named if named.count(name) > 1})
                if repeated:
                    raise UserTableError(f"{at(path, first)}: column(s) {repeated} appear more than once in the header")
                continue
            if len(record) > len(header):
                if any(cell.strip() for cell in record[len(header) :]):
                    raise UserTableError(
                        f"{at(path, first)}: {len(record)} values, but the header (line {header_line}) names "
                        f"{len(header)} columns; quote cells that contain a comma"
                    )
                record = record[: len(header)]
            rows.append(record + [""] * (len(header) - len(record)))
            numbers.append(first)
    except csv.Error as error:
        raise UserTableError(f"{at(path, reader.line_num)}: not a readable CSV row ({error})") from None
    assert header is not None  # the text is not blank
    return header, header_line, rows, numbers


def check_characters(table: pd.DataFrame, path: str | Path, columns: Iterable[str]) -> None:
    """Refuse control and invisible format characters in ``columns``, naming the line, column and characters."""
    for column in columns:
        for line, value in table[column].items():
            found = bad_characters(value)
            if found:
                raise UserTableError(
                    f"{at(path, line, column)}: {value!r} contains the control or invisible character(s) "
                    f"{', '.join(dict.fromkeys(found))}; an identifier must be visible text"
                )


def lines(table: pd.DataFrame, mask: Iterable[bool] | pd.Series, column: str, limit: int = SHOWN) -> str:
    """``line 4 ('a'), line 9 ('b') and 3 more``: the rows of ``mask`` with their value in ``column``."""
    chosen = table[pd.Series(list(mask), index=table.index) if not isinstance(mask, pd.Series) else mask]
    shown = ", ".join(f"line {line} ({value!r})" for line, value in chosen[column].head(limit).items())
    return shown + (f" and {len(chosen) - limit} more" if len(chosen) > limit else "")


def require_values(table: pd.DataFrame, path: str | Path, columns: Iterable[str], why: str = "") -> None:
    """Refuse empty cells in ``columns`` (after normalisation), naming the lines."""
    for column in columns:
        empty = table[column] == ""
        if empty.any():
            where = ", ".join(f"line {line}" for line in table.index[empty][:SHOWN])
            more = f" and {int(empty.sum()) - SHOWN} more" if empty.sum() > SHOWN else ""
            raise UserTableError(f"{path}, column {column}: empty on {where}{more}; {column} is required{why}")


# ---- files ------------------------------------------------------------------------------------------------------


class FileLookup:
    """Finds, for a listed file that does not exist, one whose name differs only in Unicode normal form or in
    letter case (folder listings are cached, so a table with many missing files lists each folder once)."""

    def __init__(self) -> None:
        self._listings: dict[Path, dict[str, list[str]]] = {}

    def _index(self, folder: Path) -> dict[str, list[str]]:
        if folder not in self._listings:
            index: dict[str, list[str]] = {}
            try:
                names = sorted(os.listdir(folder))
            except OSError:
                names = []
            for name in names:
                nfc = unicodedata.normalize("NFC", name)
                index.setdefault("nfc:" + nfc, []).append(name)
                index.setdefault("case:" + nfc.casefold(), []).append(name)
            self._listings[folder] = index
        return self._listings[folder]

    def _near(self, folder: Path, name: str) -> tuple[str, list[str]] | None:
        """A name in ``folder`` that differs from ``name`` only in normal form and/or letter case, and how."""
        index = self._index(folder)
        nfc = unicodedata.normalize("NFC", name)
        for candidate in index.get("nfc:" + nfc, []):
            if candidate != name:
                return candidate, ["Unicode normal form"]
        for candidate in index.get("case:" + nfc.casefold(), []):
            if candidate != name:
                same_form = unicodedata.normalize("NFC", candidate) == candidate and nfc == name
                return candidate, (["letter case"] if same_form else ["Unicode normal form", "letter case"])
        return None

    def near_miss(self, path: str | Path) -> tuple[Path, list[str]] | None:
        """For a ``path`` that does not exist: an existing path whose names differ from it only in normal form
        or letter case, and how they differ (``['Unicode normal form']``, ...); None when there is none."""
        parts = Path(path).parts
        if not parts:
            return None
        current, rest = (Path(parts[0]), parts[1:]) if Path(path).is_absolute() else (Path("."), parts)
        kinds: list[str] = []
        for part in rest:
            if (current / part).exists():
                current = current / part
                continue
            found = self._near(current, part)
            if found is None:
                return None
            current = current / found[0]
            kinds.extend(found[1])
        return (current, list(dict.fromkeys(kinds))) if kinds else None

    def hint(self, path: str | Path) -> str | None:
        """The sentence a "file does not exist" message adds when :meth:`near_miss` finds a file, else None."""
        found = self.near_miss(path)
        if found is None:
            return None
        existing, kinds = found
        listed, on_disk = Path(path).name, existing.name
        spelled = f" (the table writes {ascii(listed)}, the file system {ascii(on_disk)})" if listed != on_disk else ""
        return (
            f"but {existing} exists, whose name differs from the table's only in {' and '.join(kinds)}{spelled}: "
            "rename the file or write its name in the table as it is on disk"
        )


def same_file_groups(table: pd.DataFrame, column: str, base: str | Path) -> list[list]:
    """Rows (index labels) that name one file, in groups of two or more, in table order.

    ``column`` holds paths relative to ``base`` (or absolute). Existing files are the same when they are the same
    file on disk (device and inode: another spelling, a link, a case-insensitive file system); files that do not
    exist when their normalised paths (``..`` resolved, Unicode NFC) are equal."""
    base = Path(base)
    parent: dict = {}

    def root(label):
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    owner: dict[tuple, object] = {}
    for label, name in table[column].items():
        parent[label] = label
        path = Path(name) if Path(name).is_absolute() else base / name
        try:
            status = os.stat(path)
            key: tuple = ("file", status.st_dev, status.st_ino)
        except OSError:
            key = ("path", unicodedata.normalize("NFC", os.path.normpath(os.path.abspath(path))))
        if key in owner:
            parent[root(label)] = root(owner[key])
        else:
            owner[key] = label
    groups: dict = {}
    for label in table.index:
        groups.setdefault(root(label), []).append(label)
    return [members for members in groups.values() if len(members) > 1]
