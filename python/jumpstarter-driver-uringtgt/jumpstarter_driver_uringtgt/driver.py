"""The exporter side: `jumpstarter_driver_uringtgt.driver.ISCSI`, a drop-in for
`jumpstarter_driver_iscsi.driver.ISCSI` that runs uringtgt (a user-space iSCSI target: no root,
no kernel modules) instead of configuring the kernel's LIO target."""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream
from jumpstarter_driver_opendal.driver import Opendal
from pydantic import validate_call

from . import process
from .common import (
    COMPRESSIONS,
    IMAGE_NOT_FOUND,
    MAX_LINE,
    ConfigurationError,
    ControlClient,
    ControlError,
    ISCSIError,
    name_from_file,
    parse_headers,
    parse_response,
    request_line,
)
from jumpstarter.driver import Driver, export

__all__ = ["ISCSI", "ISCSIError", "ConfigurationError", "ControlError"]

MiB = 1 << 20

# Python logging level names -> uringtgt's filters (which ignore case).
_LEVELS = {"CRITICAL": "error", "FATAL": "error", "ERROR": "error", "WARNING": "warn", "WARN": "warn",
           "INFO": "info", "DEBUG": "debug", "TRACE": "trace", "OFF": "off", "NOTSET": "info"}

# Keys handed on only when set (uringtgt's defaults apply otherwise).
_OPTIONAL_KEYS = ("offload_threads", "limits", "auth", "allowed_initiators", "allowed_networks",
                  "control_socket_group", "max_connections", "max_sessions_per_initiator")

# The first line `uringtgt ctl upload` prints.
_UPLOAD_LINE = re.compile(r"^(?P<address>\S+) (?P<iqn>\S+) (?P<lun_id>\d+)$")


def log_levels(level: str) -> tuple[str, str]:
    """(Python logging level, uringtgt log filter) for a `log_level` in either case."""
    upper = str(level).upper()
    if upper not in _LEVELS:
        raise ConfigurationError(f"log_level: {level!r} is not one of {', '.join(sorted(_LEVELS))}")
    # Python's logging has no TRACE: its most verbose level is DEBUG.
    return ("DEBUG" if upper == "TRACE" else "CRITICAL" if upper == "OFF" else upper), _LEVELS[upper]


@dataclass(kw_only=True)
class ISCSI(Driver):
    """iSCSI target driver for Jumpstarter, served by uringtgt.

    The first seven fields are the old driver's, with its defaults; the rest are uringtgt's
    (README, "Configuration"). The configuration is handed to `uringtgt serve`, found through
    $URINGTGT_BIN or on PATH; a `control_socket` that already answers is attached to instead.
    """

    root_dir: str = "/var/lib/iscsi"
    iqn_prefix: str = "iqn.2024-06.dev.jumpstarter"
    target_name: str = "target1"
    host: str = field(default="")
    port: int = 3260
    remove_created_on_close: bool = False
    block_device_allowlist: List[str] = field(default_factory=list)

    control_socket: Optional[str] = None
    reactors: Optional[int] = None
    cpus: Optional[List[int]] = None
    poll_mode: Literal["adaptive", "busy", "frugal"] = "adaptive"
    luns: List[Dict[str, Any]] = field(default_factory=list)
    offload_threads: Optional[int] = None
    limits: Optional[Dict[str, Any]] = None

    # Access control (uringtgt's README, "Security"): handed on only when set, so a uringtgt
    # without them still takes every configuration that does not use them.
    auth: Optional[Dict[str, Any]] = None
    allowed_initiators: List[str] = field(default_factory=list)
    allowed_networks: List[str] = field(default_factory=list)
    control_socket_group: Optional[str] = None
    max_connections: Optional[int] = None
    max_sessions_per_initiator: Optional[int] = None

    def __post_init__(self):
        # `log_level` is the base Driver's field, read by logging.setLevel (upper case only);
        # uringtgt takes either case, so both spellings are accepted here.
        self.log_level, self._uringtgt_level = log_levels(self.log_level)
        if hasattr(super(), "__post_init__"):
            super().__post_init__()

        for path in self.block_device_allowlist:
            if not os.path.isabs(path):
                raise ConfigurationError(f"block_device_allowlist entry '{path}' is not an absolute path")
        if self.reactors is not None and self.cpus is not None:
            raise ConfigurationError("set either reactors or cpus, not both")

        self.root_dir = os.path.abspath(self.root_dir)
        os.makedirs(self.root_dir, exist_ok=True)
        self.children["storage"] = Opendal(
            scheme="fs", kwargs={"root": self.root_dir}, remove_created_on_close=self.remove_created_on_close
        )
        self.storage = self.children["storage"]

        sock = self.control_socket or os.path.join(self.root_dir, "uringtgt.sock")
        self._socket = os.path.abspath(sock)
        self._control = ControlClient(self._socket, timeout=None)
        self._target = process.acquire(self._socket, self.uringtgt_config(), self.logger)

    @classmethod
    def client(cls) -> str:
        return "jumpstarter_driver_uringtgt.client.ISCSIServerClient"

    def uringtgt_config(self) -> dict[str, Any]:
        """The YAML configuration `uringtgt serve` gets: only keys it knows (it refuses others)."""
        cfg: dict[str, Any] = {
            "root_dir": self.root_dir,
            "iqn_prefix": self.iqn_prefix,
            "target_name": self.target_name,
            "host": self.host,
            "port": self.port,
            "remove_created_on_close": self.remove_created_on_close,
            "block_device_allowlist": list(self.block_device_allowlist),
            "control_socket": self._socket,
            "poll_mode": self.poll_mode,
            "log_level": self._uringtgt_level,
            "luns": [dict(lun) for lun in self.luns],
        }
        if self.reactors is not None:
            cfg["reactors"] = self.reactors
        if self.cpus is not None:
            cfg["cpus"] = list(self.cpus)
        for key in _OPTIONAL_KEYS:
            value = getattr(self, key)
            if value is not None and value != []:
                cfg[key] = value
        return cfg

    def _call(self, method: str, params: Any = None) -> Any:
        try:
            return self._control.call(method, params)
        except OSError as e:
            raise ISCSIError(f"{method}: uringtgt control socket {self._socket}: {e}") from e

    @export
    @validate_call
    def start(self) -> None:
        """Open the portal (a no-op when it is open: uringtgt opens it when it starts)."""
        self._call("start")

    @export
    @validate_call
    def stop(self) -> None:
        """Close the portal and end every session; LUNs and image files stay."""
        self._call("stop")

    @export
    @validate_call
    def get_host(self) -> str:
        return self._call("get_host")

    @export
    @validate_call
    def get_port(self) -> int:
        return int(self._call("get_port"))

    @export
    @validate_call
    def get_target_iqn(self) -> str:
        return self._call("get_target_iqn")

    def _existing_size(self, file_path: str) -> Optional[int]:
        norm = os.path.normpath(file_path)
        if os.path.isabs(norm) or norm.startswith(".."):
            return None  # uringtgt refuses it with its own message
        try:
            return os.stat(os.path.join(self.root_dir, norm)).st_size
        except OSError:
            return None

    def _make_parent(self, file_path: str) -> None:
        # The old driver created missing directories under root_dir; uringtgt does not.
        norm = os.path.normpath(file_path)
        if os.path.isabs(norm) or norm.startswith("..") or not os.path.dirname(norm):
            return
        parent = os.path.join(self.root_dir, os.path.dirname(norm))
        root = os.path.realpath(self.root_dir)
        if os.path.realpath(parent).startswith(root + os.sep):
            os.makedirs(parent, exist_ok=True)

    @export
    @validate_call
    def add_lun(self, name: str, file_path: str, size_mb: int = 0, is_block: bool = False) -> str:
        """Export `file_path` (relative to root_dir; with is_block an allow-listed device) as LUN
        `name`, replacing a LUN of that name. A new file needs size_mb and is created sparse; a
        larger size_mb grows the file; a smaller one serves the file's own size (never shrunk)."""
        if not is_block:
            self._make_parent(file_path)
        if not is_block and size_mb > 0:
            current = self._existing_size(file_path)
            if current is not None and current > size_mb * MiB:
                # The old client passes the image size rounded DOWN to whole MiB: serve it all.
                self.logger.warning(
                    "%s is %d bytes, more than size_mb %d: serving the file's size", file_path, current, size_mb
                )
                size_mb = 0
        self._call("add_lun", {"name": name, "file_path": file_path, "size_mb": size_mb, "is_block": is_block})
        return name

    @export
    @validate_call
    def remove_lun(self, name: str) -> None:
        """Stop exporting LUN `name`; its file stays."""
        self._call("remove_lun", {"name": name})

    @export
    @validate_call
    def list_luns(self) -> List[Dict[str, Any]]:
        """[{name, path, size, lun_id, is_block, read_only, backing}], size in bytes."""
        return self._call("list_luns")

    @export
    @validate_call
    def clear_all_luns(self) -> None:
        """Remove every LUN of the target (files stay)."""
        self._call("clear_all_luns")

    @export
    @validate_call
    def decompress(self, src_path: str, dst_path: str, algo: str) -> None:
        """Decompress `src_path` into `dst_path` (both under root_dir), as the old driver did, through
        uringtgt's `import_image` (streaming, temp file, fsync, atomic rename). `dst_path` must be
        `<name>.img` in root_dir, the only form the old client uses."""
        compression = "zstd" if algo in ("zst", "zstd") else algo
        if compression not in COMPRESSIONS or compression == "none":
            raise ValueError(f"Unsupported compression algo: {algo}")
        dst = os.path.normpath(dst_path)
        if os.path.dirname(dst) or not dst.endswith(".img") or dst == ".img":
            raise ValueError(f"decompress: dst_path must be <name>.img in root_dir, not {dst_path!r}")
        name = dst[: -len(".img")]
        exported = any(lun["name"] == name for lun in self._call("list_luns"))
        self._call("import_image", {"name": name, "src_path": src_path, "compression": compression})
        if not exported:
            # import_image also exports the image; decompress alone never did.
            self._call("remove_lun", {"name": name})

    @export
    @validate_call
    def get_stats(self) -> Dict[str, Any]:
        """I/O statistics per LUN and per reactor (uringtgt's `get_stats`)."""
        return self._call("get_stats")

    @export
    @validate_call
    def list_sessions(self) -> List[Dict[str, Any]]:
        """Logged-in sessions (uringtgt's `list_sessions`)."""
        return self._call("list_sessions")

    @export
    @validate_call
    def image_info(self, name: str) -> Optional[Dict[str, Any]]:
        """{name, path, size, image_bytes, sha256} of `<root_dir>/<name>.img`, or None if absent."""
        try:
            return self._call("image_info", {"name": name})
        except ControlError as e:
            if e.code == IMAGE_NOT_FOUND:
                return None
            raise

    @export
    @validate_call
    async def upload_image(
        self,
        name: str,
        size: int,
        compression: Literal["none", "gz", "xz", "bz2", "zstd"] = "none",
        sha256: Optional[str] = None,
        size_mb: int = 0,
        force: bool = False,
        read_only: bool = False,
        src: Any = None,
    ) -> Dict[str, Any]:
        """Import an image into `<root_dir>/<name>.img` and export it as LUN `name`.

        `src` is a client stream resource carrying `size` bytes (the file as stored), written
        straight into uringtgt's `upload_image` on the control socket; without `src`, `size` must
        be 0 and `sha256` given: a conditional upload that re-exports the image in place when
        its digest matches (README, "Uploading images")."""
        params: dict[str, Any] = {
            "name": name,
            "size": size,
            "compression": compression,
            "size_mb": size_mb,
            "force": force,
            "read_only": read_only,
        }
        if sha256 is not None:
            params["sha256"] = sha256
        if src is None:
            if size != 0:
                raise ValueError("upload_image without a source stream must have size 0")
            return await anyio.to_thread.run_sync(self._call, "upload_image", params)
        async with self.resource(src) as res:
            try:
                return await self._stream_upload(params, res)
            except OSError as e:
                raise ISCSIError(f"upload_image: uringtgt control socket {self._socket}: {e}") from e

    async def _stream_upload(self, params: dict[str, Any], res) -> Dict[str, Any]:
        size = params["size"]
        async with await anyio.connect_unix(self._socket) as sock:
            await sock.send(request_line(1, "upload_image", params))
            sent = 0
            async for chunk in res:
                if sent + len(chunk) > size:
                    raise ValueError(f"upload_image: the source holds more than the announced {size} bytes")
                await sock.send(chunk)
                sent += len(chunk)
            if sent < size:
                # uringtgt answers a short upload once it sees the end of the stream.
                await sock.send_eof()
            reader = BufferedByteReceiveStream(sock)
            try:
                line = await reader.receive_until(b"\n", MAX_LINE) + b"\n"
            except (anyio.IncompleteRead, anyio.EndOfStream):
                line = b""
            return parse_response("upload_image", line)

    @export
    @validate_call
    def upload_url(
        self,
        url: str,
        headers: List[str] | Dict[str, str] = [],  # noqa: B006 (pydantic copies defaults)
        name: Optional[str] = None,
        size_mb: int = 0,
        force: bool = False,
    ) -> Dict[str, Any]:
        """Have the exporter fetch an http(s) image itself (`uringtgt ctl upload URL`): the
        exporter's network path is far faster than Jumpstarter's byte stream. Returns {name,
        address, iqn, lun_id, bytes, sha256, skipped}."""
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"upload_url: not an http(s) URL: {url}")
        name = name or name_from_file(url)
        argv = [process.find_binary(), "ctl", "--socket", self._socket, "upload", url, "--name", name]
        for h in parse_headers(headers):
            argv += ["--header", h]
        if size_mb:
            argv += ["--size-mb", str(size_mb)]
        if force:
            argv.append("--force")
        self.logger.info("fetching %s on the exporter", url.split("?", 1)[0])
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if proc.returncode != 0:
            msg = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"status {proc.returncode}"
            raise ISCSIError(msg.removeprefix("uringtgt: "))
        # Only `ctl upload`'s first line (`host:port iqn lun_id`) is parsed; the digest and
        # size come from image_info, which the import has just recorded.
        lines = proc.stdout.strip().splitlines()
        first = _UPLOAD_LINE.match(lines[0]) if lines else None
        if first is None:
            raise ISCSIError(f"upload_url: unexpected output of uringtgt ctl upload: {proc.stdout!r}")
        info = self._call("image_info", {"name": name})
        return {
            "name": name,
            "address": first["address"],
            "iqn": first["iqn"],
            "lun_id": int(first["lun_id"]),
            "bytes": info.get("image_bytes") or info.get("size"),
            "sha256": info.get("sha256"),
            "skipped": any("skipped" in line for line in lines[1:]),
        }

    def close(self):
        """Drop this instance's hold on the target; the last instance of this process stops a
        uringtgt it started (LUNs and files of a shared or attached target are left alone)."""
        target, self._target = getattr(self, "_target", None), None
        if target is not None:
            process.release(target)
        super().close()

