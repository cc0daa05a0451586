"""As an exporter runs the driver: its YAML through Jumpstarter's own config classes, one driver
tree per lease (two alive at once), attaching to a running target, and the replaced driver's
client used unchanged against this driver."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass

import pytest
import yaml
from click.testing import CliRunner
from jumpstarter.common.utils import serve
from jumpstarter.config.exporter import ExporterConfigV1Alpha1, ExporterConfigV1Alpha1DriverInstance

from . import process
from .common import ControlClient
from .conftest import compress, make_image
from .driver import ISCSI
from .libiscsi_reader import read_lun

MiB = 1 << 20


def exporter_yaml(root, type_="jumpstarter_driver_uringtgt.driver.ISCSI", **extra) -> str:
    config = {"root_dir": str(root), "target_name": "lab", "host": "127.0.0.1", "port": 0, "reactors": 1}
    config.update(extra)
    return yaml.safe_dump(
        {
            "apiVersion": "jumpstarter.dev/v1alpha1",
            "kind": "ExporterConfig",
            "metadata": {"namespace": "default", "name": "rig1"},
            "endpoint": "grpc.example:443",
            "token": "t",
            "export": {"iscsi": {"type": type_, "config": config}},
        }
    )


def device_factory(config: ExporterConfigV1Alpha1):
    """What Exporter gets as its device_factory: called once per lease."""
    return ExporterConfigV1Alpha1DriverInstance(
        type="jumpstarter_driver_composite.driver.Composite", description=config.description, children=config.export
    ).instantiate


def lun_bytes(iscsi, name: str) -> bytes:
    lun = next(x for x in iscsi.list_luns() if x["name"] == name)
    # int(): the old client hands numbers on as the wire's doubles.
    return read_lun(iscsi.get_host(), int(iscsi.get_port()), iscsi.get_target_iqn(), int(lun["lun_id"]))


def test_exporter_yaml_is_loaded_and_instantiated(binary, workdir, libiscsi):
    path = workdir / "exporter.yaml"
    path.write_text(exporter_yaml(workdir / "root", log_level="debug"))
    config = ExporterConfigV1Alpha1.load_path(path)
    root = device_factory(config)()
    try:
        assert isinstance(root.children["iscsi"], ISCSI)
        assert root.children["iscsi"].logger.level == 10  # `debug` in lower case is accepted
        with serve(root) as client:
            iscsi = client.iscsi
            raw = make_image(workdir / "disk.img", 2 * MiB + 512)
            src = compress(workdir / "disk.img", "xz")
            assert iscsi.upload_image("disk", str(src)) == "iqn.2024-06.dev.jumpstarter:lab"
            assert lun_bytes(iscsi, "disk") == raw
    finally:
        root.close()
    assert not ControlClient(str(workdir / "root" / "uringtgt.sock")).answers()


def test_uringtgt_serve_reads_the_same_exporter_yaml(uringtgt_bin, workdir):
    """The class name still contains "iscsi", so `uringtgt serve --config exporter.yaml` finds the block."""
    path = workdir / "exporter.yaml"
    path.write_text(exporter_yaml(workdir / "root"))
    proc = subprocess.Popen([uringtgt_bin, "serve", "--config", str(path)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:") and line.strip().endswith("iqn.2024-06.dev.jumpstarter:lab")
    finally:
        proc.terminate()
        proc.wait(10)


def test_two_leases_in_one_process_share_one_target(binary, workdir, libiscsi):
    path = workdir / "exporter.yaml"
    path.write_text(exporter_yaml(workdir / "root"))
    factory = device_factory(ExporterConfigV1Alpha1.load_path(path))
    sock = str(workdir / "root" / "uringtgt.sock")

    lease1 = factory()
    pid = lease1.children["iscsi"]._target.proc.pid
    raw = make_image(workdir / "a.img", 4 * 512)
    with serve(lease1) as c1:
        c1.iscsi.upload("a", workdir / "a.img")
        # The next lease's tree is built while this one still lives.
        lease2 = factory()
        assert lease2.children["iscsi"]._target is lease1.children["iscsi"]._target
        assert lease2.children["iscsi"]._target.proc.pid == pid
    lease1.close()
    # The first lease's end leaves the second lease's target serving.
    assert ControlClient(sock).answers()
    with serve(lease2) as c2:
        assert lun_bytes(c2.iscsi, "a") == raw
        c2.iscsi.add_lun("b", "b.img", 1)
    lease2.close()
    assert not ControlClient(sock).answers()
    with pytest.raises(ProcessLookupError):
        for _ in range(100):
            import os

            os.kill(pid, 0)
            time.sleep(0.05)


def test_attaches_to_an_already_running_target(binary, workdir, libiscsi):
    root = workdir / "root"
    sock = workdir / "ctl.sock"
    ext = subprocess.Popen(
        [binary, "serve", "--root-dir", str(root), "--host", "127.0.0.1", "--port", "0", "--reactors", "1",
         "--target-name", "ext", "--control-socket", str(sock)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert ext.stdout.readline().startswith("listening on")
        d = ISCSI(root_dir=str(root), control_socket=str(sock), host="127.0.0.1", port=0, log_level="info")
        assert d._target.proc is None  # attached, nothing spawned
        with serve(d) as c:
            assert c.get_target_iqn() == "iqn.2024-06.dev.jumpstarter:ext"
            raw = make_image(workdir / "x.img", 8 * 512)
            c.upload("x", workdir / "x.img")
            assert lun_bytes(c, "x") == raw
        d.close()
        # Closing an attached driver leaves the target it did not start running.
        assert ext.poll() is None and ControlClient(str(sock)).answers()
    finally:
        ext.terminate()
        ext.wait(10)


@dataclass(kw_only=True)
class DriverForOldClient(ISCSI):
    """This driver, reporting the replaced driver's client class."""

    @classmethod
    def client(cls) -> str:
        return "jumpstarter_driver_iscsi.client.ISCSIServerClient"


@pytest.fixture
def old_client(binary, workdir):
    try:
        import jumpstarter_driver_iscsi.client  # noqa: F401
    except ImportError as e:
        from .conftest import missing

        missing(f"jumpstarter-driver-iscsi (the test extra) is not installed: {e}")
    d = DriverForOldClient(root_dir=str(workdir / "root"), target_name="old", host="127.0.0.1", port=0, reactors=1)
    try:
        with serve(d) as c:
            assert type(c).__module__ == "jumpstarter_driver_iscsi.client"
            yield c
    finally:
        d.close()


@pytest.mark.parametrize("compression", ["xz", "gz", "bz2", "none"])
def test_old_client_uploads_through_storage_and_decompress(old_client, workdir, libiscsi, compression):
    # 2 MiB + 5 sectors: the old client passes size_mb 2 (rounded down); the whole image is served.
    raw = make_image(workdir / "disk.img", 2 * MiB + 5 * 512, seed=4)
    src = compress(workdir / "disk.img", compression)
    old_client.start()
    assert old_client.upload_image("disk", str(src)) == "iqn.2024-06.dev.jumpstarter:old"
    luns = old_client.list_luns()
    assert [(x["name"], x["size"], x["lun_id"]) for x in luns] == [("disk", len(raw), 0)]
    assert lun_bytes(old_client, "disk") == raw
    # Its own identical-file check (size and SHA-256 through the storage child) still works.
    if compression == "none":
        assert old_client.upload_image("disk", str(src)) == "iqn.2024-06.dev.jumpstarter:old"
        assert lun_bytes(old_client, "disk") == raw


def test_old_client_methods_and_serve_cli(old_client, workdir, libiscsi):
    assert old_client.get_host() == "127.0.0.1"
    assert int(old_client.get_port()) > 0  # the old client returns the wire's double as is
    assert old_client.add_lun("a", "a.img", 1) == "a"
    assert old_client.add_lun("b", "b.img", 1) == "b"  # a second LUN (LUN 0 only, before)
    assert sorted((x["name"], x["lun_id"]) for x in old_client.list_luns()) == [("a", 0), ("b", 1)]
    old_client.remove_lun("a")
    raw = make_image(workdir / "s.img", 3 * 512, seed=8)
    src = compress(workdir / "s.img", "gz")
    res = CliRunner().invoke(old_client.cli(), ["serve", str(src)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    host_port, iqn = res.output.strip().splitlines()[-1].split()
    assert iqn == "iqn.2024-06.dev.jumpstarter:old" and host_port.startswith("127.0.0.1:")
    # The old serve clears all LUNs and rounds sizes to whole MiB (at least 1): LUN s is 1 MiB.
    assert [x["name"] for x in old_client.list_luns()] == ["s"]
    data = lun_bytes(old_client, "s")
    assert data[: len(raw)] == raw and len(data) == MiB
    old_client.stop()
    old_client.start()
    assert lun_bytes(old_client, "s")[: len(raw)] == raw


def test_process_registry_is_empty_after_the_tests_close_their_drivers():
    # Every driver above was closed: nothing of this process keeps a target alive.
    assert process._targets == {}
