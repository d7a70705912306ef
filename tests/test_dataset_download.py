"""Downloading and unpacking, against local file:// URLs and a local HTTP server; never the network."""
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pytest

from dataset.download import download_datasets, download_file, unpack
from tests.world import run_program
from utils.errors import DataError

PAYLOAD = bytes(range(256)) * 64  # 16 KiB


class _Server(http.server.ThreadingHTTPServer):
    """Serves ``files`` (name -> bytes), honours Range, records Range headers; ``cut`` truncates the next reply."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.ranges, self.cut = files, [], False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the name http.server calls)
        body = self.server.files.get(self.path.lstrip("/"))
        if body is None:
            self.send_error(404)
            return
        start = int(self.headers["Range"][len("bytes="):-1]) if self.headers.get("Range") else 0
        self.server.ranges.append(self.headers.get("Range"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.end_headers()
        if self.server.cut:
            self.server.cut = False
            self.wfile.write(body[start:start + 1000])  # then the connection closes early
            return
        self.wfile.write(body[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = _Server({"data.bin": PAYLOAD})
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_file_url_download_copies_the_bytes(tmp_path):
    (tmp_path / "src.bin").write_bytes(PAYLOAD)
    dest = download_file((tmp_path / "src.bin").as_uri(), tmp_path / "out.bin")
    assert dest.read_bytes() == PAYLOAD


def test_partial_file_is_resumed_not_restarted(tmp_path):
    (tmp_path / "src.bin").write_bytes(PAYLOAD)
    (tmp_path / "out.bin.part").write_bytes(b"X" * 100)  # marks the bytes a resume must keep
    dest = download_file((tmp_path / "src.bin").as_uri(), tmp_path / "out.bin")
    assert dest.read_bytes() == b"X" * 100 + PAYLOAD[100:]


def test_http_resume_asks_for_the_missing_range(tmp_path, server):
    (tmp_path / "out.bin.part").write_bytes(PAYLOAD[:5000])
    download_file(server.url + "data.bin", tmp_path / "out.bin")
    assert (server.ranges, (tmp_path / "out.bin").read_bytes()) == (["bytes=5000-"], PAYLOAD)


def test_interrupted_http_download_keeps_the_partial_file(tmp_path, server):
    server.cut = True
    with pytest.raises(DataError):
        download_file(server.url + "data.bin", tmp_path / "out.bin")
    assert (tmp_path / "out.bin.part").stat().st_size == 1000


def test_interrupted_http_download_completes_on_the_next_run(tmp_path, server):
    server.cut = True
    with pytest.raises(DataError):
        download_file(server.url + "data.bin", tmp_path / "out.bin")
    assert download_file(server.url + "data.bin", tmp_path / "out.bin").read_bytes() == PAYLOAD


def test_unreachable_server_gives_a_network_message(tmp_path):
    with pytest.raises(DataError, match=r"cannot reach http://127\.0\.0\.1:\d+/x\.zip .*check the network connection"):
        download_file(_closed_port_url() + "x.zip", tmp_path / "x.zip")


def test_missing_remote_file_names_the_http_status(tmp_path, server):
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(server.url + "potsdam.zip", tmp_path / "potsdam.zip")


def test_download_unpacks_into_data_path_and_removes_the_archive(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    _zip(remote / "potsdam.zip", {"potsdam/all.txt": b"a\n"})
    download_datasets(tmp_path / "data", ["potsdam"], base_url=remote.as_uri())
    unpacked, archive = tmp_path / "data" / "potsdam" / "all.txt", tmp_path / "data" / "potsdam.zip"
    assert (unpacked.read_text(), archive.exists()) == ("a\n", False)


def test_keep_archives_keeps_the_zip(tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    _zip(remote / "potsdam.zip", {"potsdam/all.txt": b"a\n"})
    download_datasets(tmp_path / "data", ["potsdam"], base_url=remote.as_uri(), keep_archives=True)
    assert (tmp_path / "data" / "potsdam.zip").is_file()


def test_unpacked_dataset_is_skipped_without_network(tmp_path):
    (tmp_path / "cityscapes").mkdir()
    assert download_datasets(tmp_path, ["cityscapes"], base_url=_closed_port_url()) == [tmp_path / "cityscapes"]


def test_archive_without_a_top_folder_unpacks_into_the_target(tmp_path):
    target = unpack(_zip(tmp_path / "a.zip", {"imgs/x.txt": b"1"}), tmp_path / "potsdamraw")
    assert (target / "imgs" / "x.txt").read_bytes() == b"1"


def test_corrupt_archive_says_to_delete_it(tmp_path):
    (tmp_path / "cocostuff.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(DataError, match="not a complete zip archive.*delete it"):
        download_datasets(tmp_path, ["cocostuff"], base_url=_closed_port_url())


def test_unknown_dataset_name_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown dataset.*choose from cocostuff, cityscapes, potsdam, potsdamraw"):
        download_datasets(tmp_path, ["imagenet"])


def test_script_reports_a_network_failure_in_one_line_with_status_2(tmp_path):
    (ended,) = run_program("dataset/dataset_download.py", ["--data_path", str(tmp_path), "potsdam",
                                                           "--base_url", _closed_port_url()], tmp_path / "console")
    assert (ended.status, ended.err.count("\n"), "cannot reach" in ended.err) == (2, 1, True)


def test_data_path_that_is_a_file_is_named(tmp_path):
    (tmp_path / "data").write_text("")
    with pytest.raises(DataError, match=r"--data_path .*data is a file; give the folder"):
        download_datasets(tmp_path / "data", ["potsdam"])
