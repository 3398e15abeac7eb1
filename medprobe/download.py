"""Fetching and unpacking the publishers' archives: resumable, retried, checksum-verified, extracted safely.

* :func:`download` streams a URL into ``<dest>.part``; an interrupted transfer resumes from the bytes already
  there with an HTTP ``Range`` request (a server that ignores it makes the download restart from zero), network
  errors and 5xx answers are retried with exponential back-off, and the finished file is renamed into place only
  after its checksum (the publisher's MD5/SHA-256 where one exists) matches. Without a published checksum the
  SHA-256 of the first download is returned so that it can be pinned in the config.
* :func:`safe_extract` unpacks zip and tar archives and refuses any member that would land outside the target
  folder (absolute paths, ``..``, links pointing out), before writing anything.
* :func:`kaggle_download` uses the official ``kaggle`` client; credentials come from the environment only
  (``KAGGLE_USERNAME`` / ``KAGGLE_KEY``) and are never logged or written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

import requests

from medprobe.io import file_digest

log = logging.getLogger("medprobe.download")

EXTRACTED_MARKER = ".medprobe-extracted"


class ChecksumError(ValueError):
    """A downloaded or user-supplied file does not have the expected checksum."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the extraction folder."""


class MissingDataError(FileNotFoundError):
    """Files the user must obtain themselves (data-use agreement, credentials) are not where they belong."""


class AccessDeniedError(ConnectionError):
    """The server refused the download (HTTP 401 or 403): access must be requested or the file fetched by hand."""

    def __init__(self, url: str, status: int, reason: str) -> None:
        super().__init__(f"{url}: HTTP {status} {reason}")
        self.url, self.status, self.reason = url, status, reason


def verify(path: str | Path, *, md5: str | None = None, sha256: str | None = None) -> str:
    """Check ``path`` against the given checksum(s); return its SHA-256. Raises :class:`ChecksumError`."""
    path = Path(path)
    actual_sha = file_digest(path, "sha256")
    if sha256 and actual_sha != sha256.lower():
        raise ChecksumError(f"{path}: SHA-256 {actual_sha} does not match the expected {sha256}")
    if md5:
        actual_md5 = file_digest(path, "md5")
        if actual_md5 != md5.lower():
            raise ChecksumError(f"{path}: MD5 {actual_md5} does not match the expected {md5}")
    return actual_sha


def quarantine(path: Path) -> Path:
    """Move a file that failed verification to ``<name>.bad`` (replacing an older one) and return that path."""
    bad = path.with_name(path.name.removesuffix(".part") + ".bad")
    os.replace(path, bad)
    return bad


def download(
    url: str,
    dest: str | Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    session: requests.Session | None = None,
) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify it, return its SHA-256.

    An existing ``dest`` that passes the checksum is kept without any network access; one that fails is
    downloaded again. ``file://`` URLs are copied (useful for mirrors on a shared disk).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        try:
            return verify(dest, md5=md5, sha256=sha256)
        except ChecksumError as error:
            bad = quarantine(dest)
            log.warning("%s; moved it aside to %s and downloading it again", error, bad)
    partial = dest.with_name(dest.name + ".part")
    parsed = urlparse(url)
    if parsed.scheme == "file":
        shutil.copyfile(unquote(parsed.path), partial)
    elif parsed.scheme in ("http", "https"):
        _fetch_with_retries(url, partial, retries=retries, backoff=backoff, timeout=timeout, session=session)
    else:
        raise ValueError(f"{url}: unsupported URL scheme {parsed.scheme!r} (http, https, file)")
    try:
        digest = verify(partial, md5=md5, sha256=sha256)
    except ChecksumError as error:
        # A corrupt transfer must never be used nor resumed: keep it aside for inspection.
        bad = quarantine(partial)
        raise ChecksumError(f"{error}; the file was moved aside to {bad} and will not be used") from None
    os.replace(partial, dest)
    if not (md5 or sha256):
        log.warning(
            "%s: no published checksum; pin sha256 %s in the config to verify later downloads", dest.name, digest
        )
    log.info("downloaded %s -> %s (sha256 %s)", url, dest, digest)
    return digest


def _fetch_with_retries(url, partial: Path, *, retries, backoff, timeout, session) -> None:
    session = session or requests.Session()
    for attempt in range(1, retries + 1):
        try:
            _fetch_once(url, partial, timeout=timeout, session=session)
            return
        except (
            requests.ConnectionError,
            requests.Timeout,
            requests.exceptions.ChunkedEncodingError,
            _RetryableStatus,
        ) as error:
            if attempt == retries:
                raise ConnectionError(f"{url}: download failed after {retries} attempts: {error}") from error
            wait = backoff * 2 ** (attempt - 1)
            log.warning("%s: attempt %d/%d failed (%s); resuming in %.1f s", url, attempt, retries, error, wait)
            time.sleep(wait)


class _RetryableStatus(Exception):
    pass


def _fetch_once(url: str, partial: Path, *, timeout: float, session: requests.Session) -> None:
    have = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    with session.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and have:  # nothing left to fetch: the part file is complete
            return
        if response.status_code >= 500 or response.status_code == 429:
            raise _RetryableStatus(f"HTTP {response.status_code}")
        if response.status_code in (401, 403):  # not retried: asking again does not grant access
            raise AccessDeniedError(url, response.status_code, response.reason)
        if response.status_code >= 400:
            raise ConnectionError(f"{url}: HTTP {response.status_code} {response.reason}")
        mode = "ab" if have and response.status_code == 206 else "wb"
        if have and mode == "wb":
            log.info("%s: server does not resume (HTTP %d); starting over", url, response.status_code)
        with open(partial, mode) as handle:
            for chunk in response.iter_content(1 << 16):
                handle.write(chunk)
        expected = response.headers.get("Content-Length")
        if expected is not None and mode == "wb" and partial.stat().st_size != int(expected):
            raise _RetryableStatus(f"short read: {partial.stat().st_size} of {expected} bytes")


def _member_target(target: Path, name: str, archive: Path) -> Path:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be extracted outside {target}")
    resolved = (target / pure).resolve()
    if resolved != target and target not in resolved.parents:
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be extracted outside {target}")
    return resolved


def safe_extract(archive: str | Path, target: str | Path) -> Path:
    """Extract a zip or tar archive into ``target``, refusing members that escape it.

    Every member is checked before anything is written. A marker file records a finished extraction so that
    reruns skip it; an interrupted extraction is redone.
    """
    archive, target = Path(archive), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    target = target.resolve()
    marker = target / f"{EXTRACTED_MARKER}.{archive.name}"
    if marker.exists():
        return target
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            for info in handle.infolist():
                _member_target(target, info.filename, archive)
                mode = (info.external_attr >> 16) & 0o170000
                if mode == 0o120000:
                    raise UnsafeArchiveError(f"{archive}: member {info.filename!r} is a symbolic link")
            handle.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            for member in members:
                _member_target(target, member.name, archive)
                if member.issym() or member.islnk():
                    link = (
                        member.linkname if member.islnk() else str(PurePosixPath(member.name).parent / member.linkname)
                    )
                    _member_target(target, link, archive)
                if not (member.isfile() or member.isdir() or member.issym() or member.islnk()):
                    raise UnsafeArchiveError(f"{archive}: member {member.name!r} is a device or fifo")
            handle.extractall(target, members=members, filter="data")
    else:
        raise ValueError(f"{archive}: not a zip or tar archive")
    marker.write_text("ok\n")
    log.info("extracted %s -> %s", archive, target)
    return target


def kaggle_download(competition: str, dest: str | Path, files: list[str] | None = None) -> list[Path]:
    """Download a Kaggle competition's files (all, or ``files``) with the official client.

    Needs ``KAGGLE_USERNAME`` and ``KAGGLE_KEY`` in the environment and the competition's rules accepted on
    kaggle.com; raises :class:`MissingDataError` otherwise. The credentials are read by the client from the
    environment and never passed through medprobe's logs or files.
    """
    dest = Path(dest)
    missing = [name for name in ("KAGGLE_USERNAME", "KAGGLE_KEY") if not os.environ.get(name)]
    if missing:
        raise MissingDataError(
            f"Kaggle competition {competition!r}: environment variable(s) {', '.join(missing)} not set. Create an API "
            "token at https://www.kaggle.com/settings (Account > API), accept the competition's rules at "
            f"https://www.kaggle.com/competitions/{competition}/rules, export KAGGLE_USERNAME and KAGGLE_KEY, "
            f"or download the files by hand into {dest}/"
        )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("the Kaggle download needs the official client: pip install kaggle") from error
    api = KaggleApi()
    api.authenticate()
    dest.mkdir(parents=True, exist_ok=True)
    if files:
        for name in files:
            if not (dest / name).exists():
                api.competition_download_file(competition, name, path=str(dest), quiet=True)
        return [dest / name for name in files]
    api.competition_download_files(competition, path=str(dest), quiet=True)
    return sorted(dest.iterdir())
