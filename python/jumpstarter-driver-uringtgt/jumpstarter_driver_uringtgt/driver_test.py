"""The driver: unit tests (no binary), then the real uringtgt through Jumpstarter's in-process
gRPC path (`jumpstarter.common.utils.serve`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from jumpstarter.client.core import DriverError, DriverInvalidArgument
from jumpstarter.common.utils import serve
from pydantic import ValidationError

from . import process
from .common import (
    BAD_SIZE,
    INVALID_PARAMS,
    IO_ERROR,
    LUN_NOT_FOUND,
    PORTAL,
    ControlClient,
    ControlError,
    InvalidArgument,
    compression_of,
    control_error,
    integers,
    name_from_file,
    parse_headers,
)
from .conftest import driver_config, make_image
from .driver import ISCSI, ConfigurationError, log_levels
from .libiscsi_reader import Session, read_lun

MiB = 1 << 20


def bare_driver(**fields) -> ISCSI:
    """An ISCSI with its fields set and nothing started (as upstream's unit tests build one)."""
    d = object.__new__(ISCSI)
    defaults = dict(
        root_dir="/var/lib/iscsi", iqn_prefix="iqn.2024-06.dev.jumpstarter", target_name="target1", host="",
        port=3260, remove_created_on_close=False, block_device_allowlist=[], control_socket=None,
        reactors=None, cpus=None, poll_mode="adaptive", luns=[], log_level="INFO", auth=None,
        allowed_initiators=[], allowed_networks=[], control_socket_group=None, max_connections=None,
        max_sessions_per_initiator=None, offload_threads=None, limits=None,
        _socket="/var/lib/iscsi/uringtgt.sock", _uringtgt_level="info",
    )  # fmt: skip
    for k, v in {**defaults, **fields}.items():
        object.__setattr__(d, k, v)
    return d


# ---------------------------------------------------------------- unit tests, no binary


def test_old_fields_keep_their_defaults():
    from dataclasses import fields

    defaults = {f.name: f.default for f in fields(ISCSI)}
    assert defaults["root_dir"] == "/var/lib/iscsi"
    assert defaults["iqn_prefix"] == "iqn.2024-06.dev.jumpstarter"
    assert defaults["target_name"] == "target1"
    assert defaults["host"] == ""
    assert defaults["port"] == 3260
    assert defaults["remove_created_on_close"] is False
    allow = next(f for f in fields(ISCSI) if f.name == "block_device_allowlist")
    assert allow.default_factory() == []


def test_config_to_yaml_has_only_uringtgt_keys():
    d = bare_driver(
        root_dir="/srv/img", target_name="lab", host="10.0.0.5", port=3261, reactors=2,
        luns=[{"name": "d", "size_mb": 8}], _socket="/run/u.sock", _uringtgt_level="warn", log_level="WARNING",
    )  # fmt: skip
    cfg = yaml.safe_load(yaml.safe_dump(d.uringtgt_config()))
    assert cfg == {
        "root_dir": "/srv/img",
        "iqn_prefix": "iqn.2024-06.dev.jumpstarter",
        "target_name": "lab",
        "host": "10.0.0.5",
        "port": 3261,
        "remove_created_on_close": False,
        "block_device_allowlist": [],
        "control_socket": "/run/u.sock",
        "poll_mode": "adaptive",
        "log_level": "warn",
        "luns": [{"name": "d", "size_mb": 8}],
        "reactors": 2,
    }


def test_config_to_yaml_carries_access_keys_only_when_set():
    auth = {"chap": {"username": "u", "secret_file": "/etc/uringtgt/chap"}}
    cfg = bare_driver(auth=auth, allowed_networks=["127.0.0.0/8"], max_connections=8).uringtgt_config()
    assert cfg["auth"] == auth and cfg["allowed_networks"] == ["127.0.0.0/8"] and cfg["max_connections"] == 8
    for key in ("allowed_initiators", "control_socket_group", "max_sessions_per_initiator"):
        assert key not in cfg
    plain = bare_driver().uringtgt_config()
    assert not {"auth", "allowed_networks", "max_connections"} & plain.keys()


def test_config_to_yaml_carries_cpus_instead_of_reactors():
    cfg = bare_driver(cpus=[0, 1], poll_mode="busy").uringtgt_config()
    assert cfg["cpus"] == [0, 1] and "reactors" not in cfg and cfg["poll_mode"] == "busy"


@pytest.mark.parametrize(
    "given, python, uringtgt",
    [("info", "INFO", "info"), ("INFO", "INFO", "info"), ("debug", "DEBUG", "debug"), ("WARNING", "WARNING", "warn"),
     ("warn", "WARN", "warn"), ("trace", "DEBUG", "trace"), ("Error", "ERROR", "error"), ("off", "CRITICAL", "off")],
)  # fmt: skip
def test_log_level_accepted_in_either_case(given, python, uringtgt):
    assert log_levels(given) == (python, uringtgt)


def test_unknown_log_level_is_refused():
    with pytest.raises(ConfigurationError, match="log_level: 'loud'"):
        log_levels("loud")


@pytest.mark.parametrize(
    "code, caller",
    [(INVALID_PARAMS, True), (LUN_NOT_FOUND, True), (BAD_SIZE, True), (IO_ERROR, False), (PORTAL, False)],
)
def test_error_mapping_caller_errors_are_value_errors(code, caller):
    e = control_error("add_lun", code, "why")
    assert isinstance(e, ControlError) and e.code == code
    assert isinstance(e, ValueError) is caller
    assert str(e) == f"add_lun: why ({code})"


def test_results_become_integers_deeply():
    wire = {"port": 3260.0, "luns": [{"size": 4096.0, "lun_id": 1.0, "ratio": 0.5}], "name": "x"}
    assert integers(wire) == {"port": 3260, "luns": [{"size": 4096, "lun_id": 1, "ratio": 0.5}], "name": "x"}
    assert type(integers(42431.0)) is int


def test_arguments_are_validated_before_anything_runs():
    d = bare_driver()
    # No control socket behind this driver: validation must refuse first.
    with pytest.raises(ValidationError):
        d.add_lun("x", "x.img", 1.5)
    with pytest.raises(ValidationError):
        d.add_lun("x", "x.img", "lots")
    with pytest.raises(ValidationError):
        d.remove_lun(["not", "a", "name"])


def test_image_names_and_compression_from_file_names():
    assert name_from_file("/a/b/disk.img.xz") == "disk"
    assert name_from_file("https://h/x/fw.img.zst?sig=1") == "fw"
    assert name_from_file("rootfs.raw") == "rootfs.raw"
    assert compression_of("disk.img.zst") == "zstd"
    assert compression_of("disk.img.bz2") == "bz2"
    assert compression_of("https://h/d.img.gz?x=y.raw") == "gz"
    assert compression_of("disk.img") == "none"


def test_headers_are_checked():
    assert parse_headers(["Authorization:  Bearer T "]) == ["Authorization: Bearer T"]
    assert parse_headers({"X-Token": "abc"}) == ["X-Token: abc"]
    with pytest.raises(ValueError, match="Expected 'Key: Value'"):
        parse_headers(["no colon"])
    with pytest.raises(ValueError, match="Invalid header key"):
        parse_headers([": v"])


def test_missing_binary_is_a_clear_configuration_error(monkeypatch, tmp_path):
    monkeypatch.delenv(process.ENV_BIN, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigurationError, match="uringtgt not found: put it on PATH or set URINGTGT_BIN"):
        process.find_binary()
    monkeypatch.setenv(process.ENV_BIN, str(tmp_path / "nope"))
    with pytest.raises(ConfigurationError, match="is not an executable file"):
        process.find_binary()


# ---------------------------------------------------------------- with the real uringtgt


@pytest.fixture
def driver(binary, workdir):
    d = ISCSI(**driver_config(workdir / "root"))
    yield d
    d.close()


@pytest.fixture
def client(driver):
    with serve(driver) as c:
        yield c


def test_start_stop_and_getters(client, libiscsi):
    assert client.get_host() == "127.0.0.1"
    port = client.get_port()
    assert type(port) is int and port > 0
    iqn = client.get_target_iqn()
    assert iqn == "iqn.2024-06.dev.jumpstarter:pytest"
    client.add_lun("ram0", "ram0.img", 1)
    Session("127.0.0.1", port, iqn).close()
    client.stop()
    with pytest.raises(OSError, match="login"):
        Session("127.0.0.1", port, iqn)
    client.start()
    client.start()  # idempotent, as the old driver's
    with Session("127.0.0.1", client.get_port(), iqn) as s:
        assert s.capacity() == (2048, 512)


def test_add_list_remove_clear(client, workdir):
    root = workdir / "root"
    assert client.add_lun("a", "a.img", 2) == "a"
    assert client.add_lun("b", "sub/b.img", 1) == "b"
    luns = {lun["name"]: lun for lun in client.list_luns()}
    # Each LUN gets its own number (the old driver made every LUN LUN 0).
    assert luns["a"]["lun_id"] == 0 and luns["b"]["lun_id"] == 1
    assert luns["a"]["size"] == 2 * MiB and type(luns["a"]["size"]) is int
    assert luns["a"]["path"] == str(root / "a.img") and luns["a"]["is_block"] is False
    client.remove_lun("a")
    assert [lun["name"] for lun in client.list_luns()] == ["b"]
    client.add_lun("c", "c.img", 1)
    client.clear_all_luns()
    assert client.list_luns() == []
    assert (root / "a.img").stat().st_size == 2 * MiB and (root / "sub" / "b.img").exists()


def test_add_lun_never_shrinks_an_image(client, workdir):
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    data = make_image(root / "big.img", 3 * MiB + 512 * 7)
    # The old client passes the size rounded down to whole MiB: the file's own size is served.
    client.add_lun("big", "big.img", 3)
    assert client.list_luns()[0]["size"] == len(data)
    assert (root / "big.img").read_bytes() == data
    client.add_lun("big", "big.img", 4)  # a larger size still grows the file
    assert client.list_luns()[0]["size"] == 4 * MiB


def test_errors_reach_the_client_as_invalid_arguments(client):
    with pytest.raises(DriverInvalidArgument, match="absolute"):
        client.add_lun("x", "/etc/passwd", 1)
    with pytest.raises(DriverInvalidArgument, match=str(LUN_NOT_FOUND)):
        client.remove_lun("nope")
    with pytest.raises(DriverInvalidArgument):
        client.add_lun("new", "new.img", 0)  # a missing file needs a size
    with pytest.raises(DriverError):
        client.call("decompress", "x.img.gz", "../x.img", "gz")


def test_numbers_as_doubles_are_coerced_and_fractions_refused(client):
    # What a protobuf double carries: 2.0 is the integer 2, 2.5 no integer at all.
    assert client.call("add_lun", "f", "f.img", 2.0, False) == "f"
    assert client.list_luns()[0]["size"] == 2 * MiB
    with pytest.raises(DriverInvalidArgument):
        client.call("add_lun", "g", "g.img", 2.5, False)


def test_stats_and_sessions_are_exported(client, libiscsi):
    client.add_lun("s", "s.img", 1)
    with Session("127.0.0.1", client.get_port(), client.get_target_iqn()) as s:
        s.read(0, 4096, 512)
        sessions = client.list_sessions()
        assert len(sessions) == 1 and sessions[0]["initiator"] == "iqn.2024-06.dev.jumpstarter:pytest"
        assert type(sessions[0]["tsih"]) is int
    stats = client.get_stats()
    lun = next(x for x in stats["luns"] if x["name"] == "s")
    assert lun["read"]["ops"] >= 1 and lun["read"]["bytes"] >= 4096 and type(lun["read"]["bytes"]) is int


def test_image_info_of_absent_and_present_images(client, workdir):
    assert client.image_info("none") is None
    img = workdir / "i.img"
    data = make_image(img, 5 * 512)
    client.upload("i", img)
    info = client.image_info("i")
    import hashlib

    assert info["size"] == len(data) and info["sha256"] == hashlib.sha256(data).hexdigest()


def test_decompress_goes_through_import_image(client, workdir):
    import gzip

    raw = make_image(workdir / "d.img", 64 * 512)
    (workdir / "d.img.gz").write_bytes(gzip.compress(raw))
    client.storage.write_from_path("d.img.gz", str(workdir / "d.img.gz"))
    client.call("decompress", "d.img.gz", "d.img", "gz")
    assert (workdir / "root" / "d.img").read_bytes() == raw
    # decompress alone exports nothing, as before.
    assert client.list_luns() == []
    with pytest.raises(DriverInvalidArgument, match="Unsupported compression"):
        client.call("decompress", "d.img.gz", "d.img", "rar")


def test_offload_threads_and_limits_reach_uringtgt(binary, workdir, libiscsi):
    d = ISCSI(**driver_config(workdir / "root", offload_threads=1, limits={"max_cmds_per_session": 64}))
    try:
        assert d.uringtgt_config()["limits"] == {"max_cmds_per_session": 64}
        with serve(d) as c:
            c.add_lun("l", "l.img", 1)
            assert len(read_lun("127.0.0.1", c.get_port(), c.get_target_iqn())) == MiB
    finally:
        d.close()
    with pytest.raises(ConfigurationError, match="limits"):
        ISCSI(**driver_config(workdir / "root", limits={"max_cmds_per_session": 0}))


def test_startup_failure_names_the_key(binary, workdir):
    with pytest.raises(ConfigurationError, match=r"uringtgt exited with status 1: .*luns\[0\]"):
        ISCSI(**driver_config(workdir / "root", luns=[{"name": "x", "file_path": "/etc/passwd"}]))


def test_remove_created_on_close_removes_the_images_it_created(binary, workdir):
    root = workdir / "root"
    d = ISCSI(**driver_config(root, remove_created_on_close=True))
    with serve(d) as c:
        c.add_lun("tmp", "tmp.img", 1)
    d.close()
    assert not (root / "tmp.img").exists()


def test_target_dies_with_the_exporter_process(binary, workdir):
    """SIGKILL the process that spawned uringtgt: PR_SET_PDEATHSIG stops the target."""
    sock = workdir / "root" / "uringtgt.sock"
    script = textwrap.dedent(f"""
        import sys, time
        from jumpstarter_driver_uringtgt.driver import ISCSI
        d = ISCSI(**{driver_config(workdir / "root")!r})
        print(d._target.proc.pid, flush=True)
        time.sleep(600)
    """)
    exporter = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(exporter.stdout.readline())
        assert ControlClient(str(sock)).answers()
    finally:
        exporter.send_signal(signal.SIGKILL)
        exporter.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("uringtgt outlived the process that started it")
    assert not ControlClient(str(sock)).answers()


def test_invalid_argument_class_is_both_iscsi_and_value_error():
    e = InvalidArgument("m", INVALID_PARAMS, "x")
    assert isinstance(e, ValueError) and isinstance(e, ControlError)


def test_read_lun_reads_what_add_lun_serves(client, workdir, libiscsi):
    root = workdir / "root"
    root.mkdir(exist_ok=True)
    data = make_image(root / "r.img", 2 * MiB + 512, seed=9)
    client.add_lun("r", "r.img")
    assert read_lun("127.0.0.1", client.get_port(), client.get_target_iqn()) == data
