"""Fetching the official checkpoint, against a local HTTP server only (never a real host): resume
after a dropped connection, checksum mismatch, unreachable host, then unpack + convert."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from speakerd.bundle import load_bundle  # noqa: E402
from speakerd.errors import SpeakerdError  # noqa: E402
from speakerd.models.wespeaker.checkpoint import write_wespeaker_dir  # noqa: E402
from speakerd.models.wespeaker.fetch import (  # noqa: E402
    OFFICIAL_URL,
    DownloadError,
    download,
    fetch_wespeaker,
)
from speakerd.models.wespeaker.resnet import resnet34  # noqa: E402

ARCHIVE_PATH = "/models/voxceleb_resnet34_LM.zip"


@dataclass
class Served:
    """What the test server serves and what it saw."""

    payload: bytes
    drop_after: int | None = None
    """Drop the connection after this many bytes of a full (non-Range) response, once."""
    ignore_range: bool = False
    ranges: list[str | None] = field(default_factory=list)


@dataclass
class Server:
    base: str
    served: Served

    def url(self, path: str = ARCHIVE_PATH) -> str:
        return self.base + path


def make_handler(served: Served) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path != ARCHIVE_PATH:
                self.send_error(404)
                return
            data = served.payload
            rng = self.headers.get("Range")
            served.ranges.append(rng)
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", rng or "")
            if match and not served.ignore_range:
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/zip")
            self.end_headers()
            if served.drop_after is not None and start == 0:
                cut, served.drop_after = served.drop_after, None
                self.wfile.write(body[:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture()
def make_server() -> Iterator:
    started: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(served: Served) -> Server:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(served))
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="test-http")
        thread.start()
        started.append((httpd, thread))
        return Server(f"http://127.0.0.1:{httpd.server_address[1]}", served)

    yield start
    for httpd, thread in started:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A zip laid out like WeSpeaker's: one folder with avg_model.pt and config.yaml (random weights)."""
    root = tmp_path_factory.mktemp("archive")
    folder = write_wespeaker_dir(resnet34(), root / "voxceleb_resnet34_LM")
    zpath = root / "voxceleb_resnet34_LM.zip"
    with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in ("avg_model.pt", "config.yaml"):
            zf.write(folder / name, f"voxceleb_resnet34_LM/{name}")
    return zpath.read_bytes()


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_official_url_is_wespeakers_documented_zip() -> None:
    assert OFFICIAL_URL.endswith("version=voxceleb_resnet34_LM.zip")
    assert OFFICIAL_URL.startswith("https://")


def test_dropped_connection_resumes_with_range(tmp_path: Path, make_server, archive_bytes: bytes) -> None:
    cut = len(archive_bytes) // 3
    server = make_server(Served(archive_bytes, drop_after=cut))
    sha = hashlib.sha256(archive_bytes).hexdigest()
    dest = download(server.url(), tmp_path / "a.zip", sha256=sha, progress=False)
    assert dest.read_bytes() == archive_bytes
    assert server.served.ranges == [None, f"bytes={cut}-"]
    assert not (tmp_path / "a.zip.part").exists()


def test_leftover_part_file_is_resumed_by_a_new_run(tmp_path: Path, make_server, archive_bytes: bytes) -> None:
    server = make_server(Served(archive_bytes))
    have = 12345
    (tmp_path / "a.zip.part").write_bytes(archive_bytes[:have])
    download(server.url(), tmp_path / "a.zip", sha256=hashlib.sha256(archive_bytes).hexdigest(), progress=False)
    assert server.served.ranges == [f"bytes={have}-"]
    assert (tmp_path / "a.zip").read_bytes() == archive_bytes


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, make_server, archive_bytes: bytes) -> None:
    server = make_server(Served(archive_bytes, ignore_range=True))
    (tmp_path / "a.zip.part").write_bytes(b"garbage that must not stay in front")
    download(server.url(), tmp_path / "a.zip", progress=False)
    assert (tmp_path / "a.zip").read_bytes() == archive_bytes


def test_checksum_mismatch_is_an_error_and_removes_the_file(tmp_path: Path, make_server, archive_bytes: bytes) -> None:
    server = make_server(Served(archive_bytes))
    wrong = "0" * 64
    with pytest.raises(DownloadError, match=f"checksum mismatch.*expected sha256 {wrong}, got {hashlib.sha256(archive_bytes).hexdigest()}"):
        download(server.url(), tmp_path / "a.zip", sha256=wrong, progress=False)
    assert not (tmp_path / "a.zip").exists() and not (tmp_path / "a.zip.part").exists()


def test_http_error_names_the_status(tmp_path: Path, make_server, archive_bytes: bytes) -> None:
    server = make_server(Served(archive_bytes))
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(server.url("/missing.zip"), tmp_path / "a.zip", progress=False)


def test_unreachable_host_says_internet_is_needed_and_how_to_convert_offline(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}{ARCHIVE_PATH}"
    with pytest.raises(SpeakerdError) as err:
        fetch_wespeaker(tmp_path / "bundle", url=url, progress=False, timeout_s=5)
    msg = str(err.value)
    assert "needs internet access" in msg
    assert "speakerd models convert wespeaker --checkpoint DIR" in msg
    assert not (tmp_path / "bundle" / "manifest.json").exists()


def test_fetch_downloads_unpacks_and_converts(tmp_path: Path, make_server, archive_bytes: bytes, capfd) -> None:
    server = make_server(Served(archive_bytes, drop_after=len(archive_bytes) // 2))
    sha = hashlib.sha256(archive_bytes).hexdigest()
    bundle = fetch_wespeaker(tmp_path / "bundle", url=server.url(), sha256=sha, progress=True, coreml=False)
    assert len(server.served.ranges) == 2 and server.served.ranges[1] is not None
    loaded = load_bundle(tmp_path / "bundle")
    assert loaded == bundle
    assert loaded.source["url"] == server.url()
    assert loaded.source["archive_sha256"] == sha
    assert loaded.source["layout"] == "wespeaker"
    assert loaded.window_frames == (98, 148, 198, 298)
    assert loaded.artifact("onnx") is not None
    assert (tmp_path / "bundle" / "checkpoint" / "unpacked" / "voxceleb_resnet34_LM" / "avg_model.pt").is_file()
    assert not (tmp_path / "bundle" / "checkpoint" / "voxceleb_resnet34_LM.zip").exists()
    err = capfd.readouterr().err
    assert "voxceleb_resnet34_LM.zip" in err and "100%" in err  # download and conversion bars
