"""The client against the real uringtgt: uploads read back through libiscsi, skipped re-uploads,
the `serve` CLI through click's runner, exporter-side URL uploads from a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from jumpstarter.client.core import DriverError, DriverInvalidArgument
from jumpstarter.common.utils import serve

from .conftest import compress, driver_config, make_image
from .driver import ISCSI
from .libiscsi_reader import read_lun

MiB = 1 << 20


@pytest.fixture
def client(binary, workdir):
    d = ISCSI(**driver_config(workdir / "root"))
    try:
        with serve(d) as c:
            yield c
    finally:
        d.close()


def lun_bytes(client, name: str) -> bytes:
    lun = next(x for x in client.list_luns() if x["name"] == name)
    return read_lun(client.get_host(), client.get_port(), client.get_target_iqn(), lun["lun_id"])


@pytest.mark.parametrize("compression", ["none", "gz", "xz", "bz2", "zstd"])
def test_upload_reads_back_byte_exact_and_identical_reupload_is_skipped(client, workdir, libiscsi, compression):
    # 2 MiB + 3 sectors: not a whole MiB, so a rounded-down size would cut the tail.
    raw = make_image(workdir / "disk.img", 2 * MiB + 3 * 512, seed=len(compression))
    src = compress(workdir / "disk.img", compression)
    first = client.upload("disk", src)
    assert first["skipped"] is False and first["bytes"] == len(raw) and type(first["lun_id"]) is int
    assert first["sha256"] == hashlib.sha256(raw).hexdigest()
    assert lun_bytes(client, "disk") == raw
    # Streamed straight into the image: no compressed copy left on the exporter.
    assert sorted(p.name for p in (workdir / "root").iterdir() if not p.name.startswith(".")) == [
        "disk.img",
        "uringtgt.sock",
    ]
    again = client.upload("disk", src)
    assert again["skipped"] is True and again["sha256"] == first["sha256"]
    assert lun_bytes(client, "disk") == raw


def test_old_upload_image_call_returns_the_iqn_and_exact_size(client, workdir, libiscsi):
    raw = make_image(workdir / "fw.img", 1 * MiB + 512, seed=3)
    src = compress(workdir / "fw.img", "xz")
    assert client.upload_image("fw", str(src)) == client.get_target_iqn()
    assert client.list_luns()[0]["size"] == len(raw)
    assert lun_bytes(client, "fw") == raw


def test_changed_image_is_sent_again(client, workdir, libiscsi):
    img = workdir / "c.img"
    make_image(img, 64 * 512, seed=1)
    client.upload("c", img)
    changed = make_image(img, 64 * 512, seed=2)  # same size, other bytes
    result = client.upload("c", img)
    assert result["skipped"] is False
    assert lun_bytes(client, "c") == changed


def test_force_upload_sends_an_identical_image(client, workdir):
    img = workdir / "f.img"
    make_image(img, 16 * 512)
    client.upload("f", img)
    assert client.upload_image("f", str(img), force_upload=True) == client.get_target_iqn()
    assert client.upload("f", img)["skipped"] is True


def test_size_mb_gives_a_larger_lun(client, workdir, libiscsi):
    img = workdir / "s.img"
    raw = make_image(img, 8 * 512)
    client.upload_image("s", str(img), size_mb=2)
    data = lun_bytes(client, "s")
    assert len(data) == 2 * MiB and data[: len(raw)] == raw and data[len(raw) :] == bytes(2 * MiB - len(raw))


def test_corrupt_compressed_image_fails_and_keeps_the_old_one(client, workdir, libiscsi):
    img = workdir / "k.img"
    raw = make_image(img, 32 * 512)
    client.upload("k", img)
    bad = workdir / "k.img.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage-not-deflate" * 10)
    with pytest.raises(DriverInvalidArgument):
        client.upload("k", bad)
    assert lun_bytes(client, "k") == raw


def cli_runner_invoke(client, args):
    return CliRunner().invoke(client.cli(), args, catch_exceptions=False)


def test_serve_cli_prints_host_port_iqn_and_keeps_other_luns(client, workdir, libiscsi):
    client.add_lun("other", "other.img", 1)
    raw = make_image(workdir / "board.img", 3 * 512)
    src = compress(workdir / "board.img", "zstd")
    res = cli_runner_invoke(client, ["serve", str(src)])
    assert res.exit_code == 0, res.output
    port = client.get_port()
    assert res.output.strip().splitlines()[-1] == f"127.0.0.1:{port} {client.get_target_iqn()}"
    names = sorted(x["name"] for x in client.list_luns())
    # The replaced driver's serve cleared every LUN first; this one leaves them.
    assert names == ["board", "other"]
    assert lun_bytes(client, "board") == raw
    res = cli_runner_invoke(client, ["serve", str(src), "--name", "b2", "--size-mb", "1", "--force-upload"])
    assert res.exit_code == 0, res.output
    assert next(x for x in client.list_luns() if x["name"] == "b2")["size"] == MiB


def test_serve_cli_refuses_a_malformed_header(client):
    res = CliRunner().invoke(client.cli(), ["serve", "http://127.0.0.1:9/x.img", "--header", "nocolon"])
    assert res.exit_code != 0 and "Expected 'Key: Value'" in res.output
    assert client.list_luns() == []


class _Server:
    """A 127.0.0.1 HTTP server for a directory that records request headers."""

    def __init__(self, directory: Path):
        seen = self.seen = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(directory), **kw)

            def do_GET(self):
                seen.append({k.lower(): v for k, v in self.headers.items()})
                super().do_GET()

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http_server(workdir):
    d = workdir / "www"
    d.mkdir()
    s = _Server(d)
    yield s, d
    s.close()


def test_upload_url_is_fetched_by_the_exporter_with_headers(client, http_server, libiscsi):
    server, www = http_server
    raw = make_image(www / "net.img", 1 * MiB + 1024, seed=5)
    src = compress(www / "net.img", "gz")
    result = client.upload_url(f"{server.url}/{src.name}", ["X-Token: abc"])
    assert result["name"] == "net" and result["skipped"] is False and result["bytes"] == len(raw)
    assert server.seen[-1].get("x-token") == "abc"
    assert lun_bytes(client, "net") == raw
    again = client.upload_url(f"{server.url}/{src.name}", {"X-Token": "abc"})
    assert again["sha256"] == result["sha256"] == hashlib.sha256(raw).hexdigest()
    assert lun_bytes(client, "net") == raw


def test_serve_cli_with_a_url(client, http_server, libiscsi):
    server, www = http_server
    raw = make_image(www / "u.img", 4 * 512, seed=6)
    res = cli_runner_invoke(client, ["serve", f"{server.url}/u.img", "--header", "Authorization: Bearer T"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1] == f"127.0.0.1:{client.get_port()} {client.get_target_iqn()}"
    assert server.seen[-1].get("authorization") == "Bearer T"
    assert lun_bytes(client, "u") == raw
    # The old client's upload_image with a URL goes the same way.
    assert client.upload_image("u2", f"{server.url}/u.img") == client.get_target_iqn()
    assert lun_bytes(client, "u2") == raw


def test_upload_url_failure_names_the_url(client, http_server):
    server, _ = http_server
    with pytest.raises(DriverError, match="404"):
        client.upload_url(f"{server.url}/missing.img")
    with pytest.raises(DriverInvalidArgument, match="not an http"):
        client.upload_url("ftp://127.0.0.1/x.img")


def test_identical_image_with_a_new_size_mb_is_resized(client, workdir, libiscsi):
    img = workdir / "z.img"
    raw = make_image(img, 16 * 512, seed=11)
    src = compress(img, "zstd")
    client.upload("z", src)
    result = client.upload("z", src, size_mb=2)
    assert result["size"] == 2 * MiB
    data = lun_bytes(client, "z")
    assert len(data) == 2 * MiB and data[: len(raw)] == raw


def test_upload_from_an_opendal_operator(client, workdir, libiscsi):
    from opendal import Operator

    raw = make_image(workdir / "o.img", 40 * 512, seed=13)
    compress(workdir / "o.img", "bz2")
    op = Operator("fs", root=str(workdir))
    assert client.upload_image("o", "o.img.bz2", operator=op) == client.get_target_iqn()
    assert lun_bytes(client, "o") == raw
    assert client.upload("o", "o.img.bz2", operator=op)["skipped"] is True


def test_upload_stream_reports_its_total_for_the_progress_bar(workdir):
    from anyio.streams.file import FileReadStream
    from jumpstarter.streams.progress import ProgressAttribute

    from .client import _SizedStream

    async def total():
        (workdir / "p.img").write_bytes(bytes(1536))
        async with _SizedStream(stream=await FileReadStream.from_path(workdir / "p.img"), total=1536) as s:
            return s.extra(ProgressAttribute.total), len(await s.receive())

    import anyio

    assert anyio.run(total) == (1536.0, 1536)
