"""Reads a LUN back through libiscsi (libiscsi.so.7, from the libiscsi7 package that
libiscsi-bin depends on) with ctypes: the tests' independent initiator."""

from __future__ import annotations

import ctypes
import ctypes.util

SESSION_NORMAL = 2


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _ReadCapacity16(ctypes.Structure):
    # The leading fields of struct scsi_readcapacity16.
    _fields_ = [("returned_lba", ctypes.c_uint64), ("block_length", ctypes.c_uint32)]


def load() -> ctypes.CDLL:
    """libiscsi, or OSError when it is not installed."""
    name = ctypes.util.find_library("iscsi") or "libiscsi.so.7"
    lib = ctypes.CDLL(name)
    vp = ctypes.c_void_p
    lib.iscsi_create_context.restype = vp
    lib.iscsi_create_context.argtypes = [ctypes.c_char_p]
    lib.iscsi_set_targetname.argtypes = [vp, ctypes.c_char_p]
    lib.iscsi_set_session_type.argtypes = [vp, ctypes.c_int]
    lib.iscsi_full_connect_sync.argtypes = [vp, ctypes.c_char_p, ctypes.c_int]
    lib.iscsi_get_error.restype = ctypes.c_char_p
    lib.iscsi_get_error.argtypes = [vp]
    lib.iscsi_logout_sync.argtypes = [vp]
    lib.iscsi_destroy_context.argtypes = [vp]
    lib.iscsi_readcapacity16_sync.restype = vp
    lib.iscsi_readcapacity16_sync.argtypes = [vp, ctypes.c_int]
    lib.scsi_datain_unmarshall.restype = ctypes.POINTER(_ReadCapacity16)
    lib.scsi_datain_unmarshall.argtypes = [vp]
    lib.scsi_free_scsi_task.argtypes = [vp]
    lib.iscsi_read16_iov_sync.restype = vp
    lib.iscsi_read16_iov_sync.argtypes = [
        vp, ctypes.c_int, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int,
        ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.POINTER(_Iovec), ctypes.c_int,
    ]  # fmt: skip
    return lib


def _status(task: int) -> int:
    # struct scsi_task starts with `int status` (SCSI_STATUS_GOOD is 0).
    return ctypes.c_int.from_address(task).value


class Session:
    """One libiscsi login to `iqn` at `host:port`, reading LUN `lun`."""

    def __init__(self, host: str, port: int, iqn: str, lun: int = 0):
        self.lib = load()
        self.lun = lun
        self.ctx = self.lib.iscsi_create_context(b"iqn.2024-06.dev.jumpstarter:pytest")
        if not self.ctx:
            raise OSError("iscsi_create_context failed")
        self.lib.iscsi_set_targetname(self.ctx, iqn.encode())
        self.lib.iscsi_set_session_type(self.ctx, SESSION_NORMAL)
        if self.lib.iscsi_full_connect_sync(self.ctx, f"{host}:{port}".encode(), lun) != 0:
            err = self._error()
            self.lib.iscsi_destroy_context(self.ctx)
            raise OSError(f"login to {iqn} at {host}:{port} LUN {lun}: {err}")

    def _error(self) -> str:
        return (self.lib.iscsi_get_error(self.ctx) or b"").decode(errors="replace")

    def capacity(self) -> tuple[int, int]:
        """(blocks, block size) from READ CAPACITY (16)."""
        task = self.lib.iscsi_readcapacity16_sync(self.ctx, self.lun)
        if not task:
            raise OSError(f"READ CAPACITY 16: {self._error()}")
        try:
            if _status(task) != 0:
                raise OSError(f"READ CAPACITY 16: status {_status(task)}: {self._error()}")
            rc = self.lib.scsi_datain_unmarshall(task)
            if not rc:
                raise OSError("READ CAPACITY 16: cannot unmarshall")
            return rc.contents.returned_lba + 1, rc.contents.block_length
        finally:
            self.lib.scsi_free_scsi_task(task)

    def read(self, lba: int, nbytes: int, block: int) -> bytes:
        buf = ctypes.create_string_buffer(nbytes)
        iov = _Iovec(ctypes.cast(buf, ctypes.c_void_p), nbytes)
        task = self.lib.iscsi_read16_iov_sync(
            self.ctx, self.lun, lba, nbytes, block, 0, 0, 0, 0, 0, ctypes.byref(iov), 1
        )
        if not task:
            raise OSError(f"READ 16 at {lba}: {self._error()}")
        try:
            if _status(task) != 0:
                raise OSError(f"READ 16 at {lba}: status {_status(task)}: {self._error()}")
        finally:
            self.lib.scsi_free_scsi_task(task)
        return buf.raw

    def read_all(self) -> bytes:
        """The whole LUN, in 1 MiB reads."""
        blocks, block = self.capacity()
        step = (1 << 20) // block
        out = bytearray()
        for lba in range(0, blocks, step):
            n = min(step, blocks - lba)
            out += self.read(lba, n * block, block)
        return bytes(out)

    def close(self) -> None:
        if self.ctx:
            self.lib.iscsi_logout_sync(self.ctx)
            self.lib.iscsi_destroy_context(self.ctx)
            self.ctx = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_lun(host: str, port: int, iqn: str, lun: int = 0) -> bytes:
    """Every byte of LUN `lun`, read through libiscsi."""
    with Session(host, port, iqn, lun) as s:
        return s.read_all()
