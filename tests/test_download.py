"""Downloads: resume, retries, checksums; extraction refusing paths that escape the target. No network."""

import hashlib
import http.server
import io
import tarfile
import threading
import zipfile

import pytest

from medprobe import download as dl

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(http.server.BaseHTTPRequestHandler):
    fail_first = 0  # number of requests to cut off after half the body
    requests: list = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        Handler.requests.append(self.headers.get("Range"))
        start = 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].split("=")[1].split("-")[0])
        body = PAYLOAD[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if Handler.fail_first > 0:
            Handler.fail_first -= 1
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    Handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/file.bin"
    httpd.shutdown()


def test_interrupted_download_resumes_with_range_and_verifies(server, tmp_path):
    Handler.fail_first = 1
    dest = tmp_path / "file.bin"
    digest = dl.download(server, dest, md5=hashlib.md5(PAYLOAD).hexdigest(), backoff=0.01)
    assert dest.read_bytes() == PAYLOAD and digest == hashlib.sha256(PAYLOAD).hexdigest()
    assert Handler.requests[0] is None and Handler.requests[1] == f"bytes={len(PAYLOAD) // 2}-"
    assert not (tmp_path / "file.bin.part").exists()


def test_partial_file_from_an_earlier_run_is_resumed(server, tmp_path):
    Handler.fail_first = 0
    (tmp_path / "file.bin.part").write_bytes(PAYLOAD[:1000])
    dl.download(server, tmp_path / "file.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert (tmp_path / "file.bin").read_bytes() == PAYLOAD and Handler.requests == ["bytes=1000-"]


def test_checksum_mismatch_stops_naming_both_checksums_and_moves_the_file_aside(server, tmp_path):
    Handler.fail_first = 0
    with pytest.raises(
        dl.ChecksumError, match=r"MD5 [0-9a-f]{32} does not match the expected 0{32}.*moved aside"
    ) as error:
        dl.download(server, tmp_path / "file.bin", md5="0" * 32)
    assert str(tmp_path / "file.bin.bad") in str(error.value)
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.part").exists()
    assert (tmp_path / "file.bin.bad").stat().st_size > 0


def test_verified_file_is_not_downloaded_again(tmp_path):
    dest = tmp_path / "a.bin"
    dest.write_bytes(b"abc")
    assert (
        dl.download("http://127.0.0.1:9/never", dest, sha256=hashlib.sha256(b"abc").hexdigest())
        == hashlib.sha256(b"abc").hexdigest()
    )


def test_file_url_is_copied(tmp_path):
    source = tmp_path / "src.bin"
    source.write_bytes(b"xyz")
    dl.download(source.as_uri(), tmp_path / "out" / "x.bin")
    assert (tmp_path / "out" / "x.bin").read_bytes() == b"xyz"


def _zip(path, names):
    with zipfile.ZipFile(path, "w") as handle:
        for name in names:
            handle.writestr(name, "data")


def test_zip_extraction_and_traversal_refused(tmp_path):
    good = tmp_path / "good.zip"
    _zip(good, ["folder/a.txt", "b.txt"])
    out = dl.safe_extract(good, tmp_path / "out")
    assert (out / "folder" / "a.txt").read_text() == "data"
    for bad_name in ["../evil.txt", "/abs/evil.txt", "folder/../../evil.txt"]:
        bad = tmp_path / "bad.zip"
        _zip(bad, ["ok.txt", bad_name])
        with pytest.raises(dl.UnsafeArchiveError, match="outside"):
            dl.safe_extract(bad, tmp_path / "target")
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "target" / "ok.txt").exists()


def test_tar_traversal_and_escaping_symlink_refused(tmp_path):
    def tar(path, members):
        with tarfile.open(path, "w:gz") as handle:
            for info, data in members:
                handle.addfile(info, io.BytesIO(data) if data is not None else None)

    escape = tarfile.TarInfo("../escape.txt")
    escape.size = 1
    tar(tmp_path / "a.tar.gz", [(escape, b"x")])
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(tmp_path / "a.tar.gz", tmp_path / "t1")
    link = tarfile.TarInfo("link")
    link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    tar(tmp_path / "b.tar.gz", [(link, None)])
    with pytest.raises(dl.UnsafeArchiveError):
        dl.safe_extract(tmp_path / "b.tar.gz", tmp_path / "t2")
    fine = tarfile.TarInfo("dir/ok.txt")
    fine.size = 2
    tar(tmp_path / "c.tar.gz", [(fine, b"ok")])
    assert (dl.safe_extract(tmp_path / "c.tar.gz", tmp_path / "t3") / "dir" / "ok.txt").read_text() == "ok"


def test_refused_download_is_not_retried_and_leaves_nothing(tmp_path):
    class Refusing(http.server.BaseHTTPRequestHandler):
        calls = 0

        def log_message(self, *args):
            pass

        def do_GET(self):
            Refusing.calls += 1
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/record/files/a.zip"
        with pytest.raises(dl.AccessDeniedError, match="HTTP 403") as caught:
            dl.download(url, tmp_path / "a.zip", backoff=0.01)
    finally:
        httpd.shutdown()
    assert caught.value.status == 403 and caught.value.url == url
    assert Refusing.calls == 1  # asking again does not grant access
    assert not (tmp_path / "a.zip").exists()


def test_kaggle_without_credentials_names_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    with pytest.raises(dl.MissingDataError, match="KAGGLE_USERNAME, KAGGLE_KEY.*aptos2019-blindness-detection/rules"):
        dl.kaggle_download("aptos2019-blindness-detection", tmp_path)
