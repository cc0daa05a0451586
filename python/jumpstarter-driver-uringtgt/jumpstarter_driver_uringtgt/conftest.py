"""Fixtures: the real uringtgt binary, libiscsi, short temp dirs (Unix socket paths are short),
sample images. Under CI=true a missing tool fails the test instead of skipping it."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import zstandard

from . import libiscsi_reader
from .process import ENV_BIN

REPO = Path(__file__).resolve().parents[3]


def missing(what: str) -> None:
    """Skip locally; fail under CI=true, where every tool must be there."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: a missing tool is a failure)")
    pytest.skip(what)


@pytest.fixture(scope="session")
def uringtgt_bin() -> str:
    env = os.environ.get(ENV_BIN)
    candidates = [env] if env else [str(REPO / "target" / "release" / "uringtgt"), shutil.which("uringtgt")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    missing(f"uringtgt binary not found (set {ENV_BIN} or run `cargo build --release`)")
    raise AssertionError("unreachable")


@pytest.fixture
def binary(uringtgt_bin, monkeypatch) -> str:
    """The binary, made findable by the driver the way an exporter finds it."""
    monkeypatch.setenv(ENV_BIN, uringtgt_bin)
    return uringtgt_bin


@pytest.fixture(scope="session")
def libiscsi():
    try:
        return libiscsi_reader.load()
    except OSError as e:
        missing(f"libiscsi not installed (apt-get install libiscsi-bin): {e}")


@pytest.fixture
def workdir():
    d = tempfile.mkdtemp(prefix="ut-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def driver_config(root: Path, **extra) -> dict:
    cfg = {"root_dir": str(root), "host": "127.0.0.1", "port": 0, "target_name": "pytest", "reactors": 1}
    cfg.update(extra)
    return cfg


def make_image(path: Path, size: int, seed: int = 1) -> bytes:
    """An image with random-looking data, zero runs (sparse writes) and no MiB alignment."""
    import random

    rnd = random.Random(seed)
    data = bytearray(size)
    pos = 0
    while pos < size:
        n = min(rnd.randrange(4096, 300_000), size - pos)
        if rnd.random() < 0.6:
            data[pos : pos + n] = rnd.randbytes(n)
        pos += n
    path.write_bytes(data)
    return bytes(data)


def compress(src: Path, compression: str) -> Path:
    data = src.read_bytes()
    match compression:
        case "gz":
            out, blob = src.with_name(src.name + ".gz"), gzip.compress(data)
        case "xz":
            out, blob = src.with_name(src.name + ".xz"), lzma.compress(data)
        case "bz2":
            out, blob = src.with_name(src.name + ".bz2"), bz2.compress(data)
        case "zstd":
            out, blob = src.with_name(src.name + ".zst"), zstandard.ZstdCompressor().compress(data)
        case _:
            return src
    out.write_bytes(blob)
    return out
