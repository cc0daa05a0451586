"""The issue's "Done when", as a new user would try it: a fresh venv, `pip install
./python/jumpstarter-driver-uringtgt`, an exporter config whose only change is the `type:`, and
the old test code (`iscsi.upload_image("disk", "disk.img.xz")`, `iscsi.get_target_iqn()`) run
the way `jmp shell` runs it (JUMPSTARTER_HOST pointing at the local exporter). The LUN must read
back byte-exact through libiscsi. No root needed, no kernel module touched."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import REPO, compress, make_image, missing
from .libiscsi_reader import read_lun

MiB = 1 << 20
PACKAGE = REPO / "python" / "jumpstarter-driver-uringtgt"

EXPORTER = """\
apiVersion: jumpstarter.dev/v1alpha1
kind: ExporterConfig
metadata:
  namespace: default
  name: rig1
endpoint: ""
token: ""
export:
  iscsi:
    type: jumpstarter_driver_uringtgt.driver.ISCSI
    config:
      root_dir: {root}
      target_name: demo
      host: 127.0.0.1
      port: 0
"""

# The local exporter `jmp shell --exporter-config` would run, printing its socket.
RUN_EXPORTER = """\
import sys
from pathlib import Path
from jumpstarter.config.exporter import ExporterConfigV1Alpha1
with ExporterConfigV1Alpha1.load_path(Path(sys.argv[1])).serve_unix() as path:
    print(path, flush=True)
    sys.stdin.readline()
"""

# The old test code, unchanged.
TEST_CODE = """\
from jumpstarter.common.utils import env

with env() as client:
    iscsi = client.iscsi
    iscsi.upload_image("disk", "disk.img.xz")
    print(iscsi.get_host(), iscsi.get_port(), iscsi.get_target_iqn())
"""


@pytest.mark.skipif(not PACKAGE.is_dir(), reason="runs from the source tree only")
def test_fresh_venv_pip_install_and_old_test_code(uringtgt_bin, libiscsi, workdir):
    venv = workdir / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    pip = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "./python/jumpstarter-driver-uringtgt"],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    if pip.returncode != 0:
        if "No matching distribution" in pip.stderr or "Failed to establish" in pip.stderr:
            missing(f"the package index is not reachable: {pip.stderr.strip().splitlines()[-1]}")
        pytest.fail(f"pip install failed:\n{pip.stderr}")

    # A new user puts uringtgt on PATH; nothing else of this checkout is visible to the venv.
    env = {k: v for k, v in os.environ.items() if k not in ("URINGTGT_BIN", "PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{os.path.dirname(uringtgt_bin)}:{env.get('PATH', '/usr/bin:/bin')}"
    (workdir / "exporter.yaml").write_text(EXPORTER.format(root=workdir / "images"))
    (workdir / "run_exporter.py").write_text(RUN_EXPORTER)
    (workdir / "test_code.py").write_text(TEST_CODE)
    raw = make_image(workdir / "disk.img", 3 * MiB + 512 * 11, seed=12)  # not whole MiB
    compress(workdir / "disk.img", "xz")

    exporter = subprocess.Popen(
        [py, "run_exporter.py", "exporter.yaml"], cwd=workdir, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        sock = exporter.stdout.readline().strip()
        assert sock, "the exporter did not start"
        shell_env = env | {"JUMPSTARTER_HOST": sock, "JMP_DRIVERS_ALLOW": "UNSAFE"}
        run = subprocess.run(
            [py, "test_code.py"], cwd=workdir, env=shell_env, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr
        host, port, iqn = run.stdout.strip().splitlines()[-1].split()
        assert port.isdigit(), f"get_port() printed {port!r}, not an integer"
        assert iqn == "iqn.2024-06.dev.jumpstarter:demo"
        assert read_lun(host, int(port), iqn, 0) == raw
    finally:
        exporter.communicate("\n", timeout=60)
    assert exporter.returncode == 0
    # The exporter's end stopped the uringtgt it started.
    assert not (workdir / "images" / "uringtgt.sock").exists()
