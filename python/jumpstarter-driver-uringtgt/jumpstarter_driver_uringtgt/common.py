"""What the driver and the client share: errors, the control-socket client, image names and
compression suffixes."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

# JSON-RPC error codes of uringtgt's control plane (README, "Control plane").
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
LUN_NOT_FOUND = -32001
CONFLICT = -32002
PATH_REJECTED = -32003
IO_ERROR = -32004
NO_SPACE = -32005
BAD_SIZE = -32006
PORTAL = -32007
TOO_MANY_CLIENTS = -32008
BAD_UPLOAD = -32009
DIGEST_MISMATCH = -32010
IMAGE_NOT_FOUND = -32011

# Errors the caller can fix by changing the arguments: raised as ValueError, which Jumpstarter
# turns into INVALID_ARGUMENT (DriverInvalidArgument on the client).
CALLER_ERRORS = frozenset(
    {INVALID_PARAMS, LUN_NOT_FOUND, CONFLICT, PATH_REJECTED, BAD_SIZE, BAD_UPLOAD, DIGEST_MISMATCH, IMAGE_NOT_FOUND}
)

# File suffix -> uringtgt's compression name. `.zst` is new here; the old driver knew gz/xz/bz2.
SUFFIX_COMPRESSION = {".gz": "gz", ".xz": "xz", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd"}
COMPRESSIONS = ("none", "gz", "xz", "bz2", "zstd")

# A response line is small; this bounds a misbehaving peer.
MAX_LINE = 16 << 20


class ISCSIError(Exception):
    """Base exception for iSCSI server errors (the old driver's name, kept)."""


class ConfigurationError(ISCSIError):
    """Error in the driver's configuration, or uringtgt not found or not starting."""


class ControlError(ISCSIError):
    """uringtgt answered a control request with an error."""

    def __init__(self, method: str, code: int, message: str):
        super().__init__(f"{method}: {message} ({code})")
        self.method = method
        self.code = code
        self.message = message


class InvalidArgument(ControlError, ValueError):
    """A control error caused by the arguments (reaches the client as invalid-argument)."""


def control_error(method: str, code: int, message: str) -> ControlError:
    cls = InvalidArgument if code in CALLER_ERRORS else ControlError
    return cls(method, code, message)


def compression_of(path: str) -> str:
    """uringtgt's compression name for a file or URL path, from its suffix."""
    base = path.split("?", 1)[0].lower()
    for suffix, algo in SUFFIX_COMPRESSION.items():
        if base.endswith(suffix):
            return algo
    return "none"


def name_from_file(path: str) -> str:
    """The LUN name for an image file or URL: base name without compression and `.img` suffixes."""
    base = os.path.basename(path.split("?", 1)[0])
    for suffix in SUFFIX_COMPRESSION:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    if base.endswith(".img"):
        base = base[: -len(".img")]
    return base or "image"


def parse_headers(headers: list[str] | tuple[str, ...] | dict[str, str] | None) -> list[str]:
    """`Name: value` strings from a list of them or a dict, checked before any request is made."""
    if not headers:
        return []
    items = [f"{k}: {v}" for k, v in headers.items()] if isinstance(headers, dict) else list(headers)
    out = []
    for h in items:
        if ":" not in h:
            raise ValueError(f"Invalid header format: {h!r}. Expected 'Key: Value'.")
        key, value = h.split(":", 1)
        key, value = key.strip(), value.strip()
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"Invalid header key in: {h!r}")
        if any(ord(c) < 32 for c in value):
            raise ValueError(f"Invalid header value in: {h!r}")
        out.append(f"{key}: {value}")
    return out


def integers(value: Any) -> Any:
    """Numbers cross Jumpstarter's wire as protobuf doubles: whole floats back to int, deeply."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integers(v) for v in value]
    if isinstance(value, dict):
        return {k: integers(v) for k, v in value.items()}
    return value


def request_line(req_id: int, method: str, params: Any = None) -> bytes:
    req: dict[str, Any] = {"jsonrpc": "2.0", "id": req_id, "method": method}
    if params is not None:
        req["params"] = params
    return (json.dumps(req) + "\n").encode()


def parse_response(method: str, line: bytes) -> Any:
    if not line.endswith(b"\n"):
        raise ISCSIError(f"{method}: the control socket closed without an answer")
    resp = json.loads(line)
    if "error" in resp:
        err = resp["error"]
        raise control_error(method, int(err.get("code", 0)), str(err.get("message", "")))
    return resp.get("result")


class ControlClient:
    """Blocking JSON-RPC over uringtgt's control socket; one connection per call, so it is safe
    to use from any thread."""

    def __init__(self, path: str, timeout: float | None = 60.0):
        self.path = path
        self.timeout = timeout

    def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        return sock

    def call(self, method: str, params: Any = None) -> Any:
        with self.connect() as sock:
            sock.sendall(request_line(1, method, params))
            return parse_response(method, _read_line(sock))

    def answers(self) -> bool:
        """True when a live uringtgt serves this socket."""
        try:
            self.call("get_target_iqn")
            return True
        except (OSError, ISCSIError, ValueError):
            return False


def _read_line(sock: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_LINE:
            raise ISCSIError("control socket answer too long")
    return bytes(buf)
