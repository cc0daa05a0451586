"""The test-code side: `ISCSIServerClient`, with the old client's methods and CLI."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import os
import zlib
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional

import click
import zstandard
from anyio.abc import ObjectStream
from anyio.streams.file import FileReadStream
from jumpstarter_driver_composite.client import CompositeClient
from jumpstarter_driver_opendal.adapter import AsyncFileStream
from jumpstarter_driver_opendal.common import PathBuf
from opendal import Operator

from .common import DIGEST_MISMATCH, BAD_UPLOAD, compression_of, integers, name_from_file, parse_headers
from jumpstarter.client.core import DriverError
from jumpstarter.streams.progress import ProgressAttribute

CHUNK = 1 << 20


@dataclass(kw_only=True)
class _SizedStream(ObjectStream[bytes]):
    """A byte source with a known length, so Jumpstarter's progress bar has a total."""

    stream: Any
    total: int

    async def receive(self) -> bytes:
        if isinstance(self.stream, FileReadStream):
            return await self.stream.receive(CHUNK)
        return await self.stream.receive()

    async def send(self, item: bytes) -> None:
        raise NotImplementedError

    async def send_eof(self) -> None:
        pass

    async def aclose(self) -> None:
        await self.stream.aclose()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        return {ProgressAttribute.total: lambda: float(self.total)}


def _decompressor(compression: str, f):
    match compression:
        case "gz":
            return gzip.GzipFile(fileobj=f, mode="rb")
        case "xz":
            return lzma.LZMAFile(f, "rb")
        case "bz2":
            return bz2.BZ2File(f, "rb")
        case "zstd":
            return zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True)
        case _:
            return f


@dataclass(kw_only=True)
class ISCSIServerClient(CompositeClient):
    """Client of the uringtgt iSCSI driver: the old `jumpstarter_driver_iscsi` client's methods,
    arguments and `serve` CLI, plus stats, sessions and exporter-side URL uploads. Results are
    integers where the old driver's were (Jumpstarter's wire carries numbers as doubles)."""

    def start(self):
        """Open the target's portal (a no-op when it is open)."""
        self.call("start")

    def stop(self):
        """Close the portal and end every session; LUNs and image files stay."""
        self.call("stop")

    def get_host(self) -> str:
        """The portal's IP address."""
        return self.call("get_host")

    def get_port(self) -> int:
        """The portal's TCP port."""
        return int(self.call("get_port"))

    def get_target_iqn(self) -> str:
        """The target's IQN."""
        return self.call("get_target_iqn")

    def add_lun(self, name: str, file_path: str, size_mb: int = 0, is_block: bool = False) -> str:
        """Export `file_path` (relative to the exporter's root_dir) as LUN `name`; returns the name."""
        return self.call("add_lun", name, file_path, size_mb, is_block)

    def remove_lun(self, name: str):
        """Stop exporting LUN `name` (its file stays)."""
        self.call("remove_lun", name)

    def list_luns(self) -> List[Dict[str, Any]]:
        """[{name, path, size, lun_id, is_block, read_only, backing}], size in bytes."""
        return integers(self.call("list_luns"))

    def clear_all_luns(self):
        """Remove every LUN of the target (files stay)."""
        self.call("clear_all_luns")

    def get_stats(self) -> Dict[str, Any]:
        """I/O statistics per LUN and per reactor."""
        return integers(self.call("get_stats"))

    def list_sessions(self) -> List[Dict[str, Any]]:
        """Logged-in sessions: tsih, initiator, isid, address, reactor, negotiated keys."""
        return integers(self.call("list_sessions"))

    def image_info(self, name: str) -> Optional[Dict[str, Any]]:
        """{name, path, size, image_bytes, sha256} of the exporter's `<name>.img`, or None."""
        return integers(self.call("image_info", name))

    def _local_digest(self, path: str, compression: str, operator: Optional[Operator]) -> str:
        """SHA-256 of the uncompressed image."""
        h = hashlib.sha256()
        raw = operator.open(path, "rb") if operator is not None else open(path, "rb")
        with raw, _decompressor(compression, raw) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        return h.hexdigest()

    @asynccontextmanager
    async def _source(self, path: str, size: int, operator: Optional[Operator]):
        if operator is None:
            stream = await FileReadStream.from_path(path)
        else:
            stream = AsyncFileStream(file=await operator.to_async_operator().open(path, "rb"))
        async with _SizedStream(stream=stream, total=size) as sized:
            # No content encoding: the bytes go as stored, uringtgt decompresses them.
            async with self.resource_async(sized) as handle:
                yield handle

    def upload(
        self,
        name: str,
        src: PathBuf,
        size_mb: int = 0,
        force: bool = False,
        read_only: bool = False,
        compression: Optional[str] = None,
        operator: Optional[Operator] = None,
    ) -> Dict[str, Any]:
        """Upload a raw or compressed (.gz .xz .bz2 .zst) image into the exporter's
        `<name>.img` and export it as LUN `name`; returns {name, address, iqn, lun_id, size,
        bytes, sha256, skipped}. The bytes stream straight into uringtgt, which decompresses and
        writes them sparse. An image identical to the one in place is not sent again: the
        local hash is only computed when the exporter holds a same-named image it could equal."""
        path = str(src)
        if operator is None:
            path = os.path.abspath(path)
            size = os.path.getsize(path)
        else:
            size = int(operator.stat(path).content_length)
        compression = compression or compression_of(path)
        sha256 = None
        if not force:
            info = self.image_info(name)
            if info and info.get("sha256") and (compression != "none" or info.get("image_bytes") == size):
                self.logger.info("hashing %s to compare with the exporter's %s.img", path, name)
                try:
                    sha256 = self._local_digest(path, compression, operator)
                except (EOFError, zlib.error, lzma.LZMAError, zstandard.ZstdError) as e:
                    # Not decodable here: send it anyway and let uringtgt say what is wrong.
                    self.logger.warning("cannot decompress %s locally (%s): sending it unhashed", path, e)
                if sha256 is not None and sha256 == info["sha256"]:
                    try:
                        return integers(
                            self.call("upload_image", name, 0, compression, sha256, size_mb, force, read_only)
                        )
                    except DriverError as e:
                        # Changed meanwhile, or another LUN size: send the bytes.
                        if f"({DIGEST_MISMATCH})" not in str(e) and f"({BAD_UPLOAD})" not in str(e):
                            raise
        self.logger.info("uploading %s (%d bytes) as %s", path, size, name)
        failure: Optional[Exception] = None
        with self.portal.wrap_async_context_manager(self._source(path, size, operator)) as handle:
            try:
                result = self.call("upload_image", name, size, compression, sha256, size_mb, force, read_only, handle)
            except DriverError as e:
                # Raised outside the stream's task group, so callers get it, not an ExceptionGroup.
                failure = e
        if failure is not None:
            raise failure
        return integers(result)

    def upload_image(
        self,
        dst_name: str,
        src: PathBuf,
        size_mb: int = 0,
        operator: Optional[Operator] = None,
        force_upload: bool = False,
    ) -> str:
        """The old client's call: upload `src` (a file, or an http(s) URL the exporter fetches)
        as `<dst_name>.img`, export it as LUN `dst_name` and return the target IQN. size_mb 0
        serves the image's exact size (rounded up to 512 bytes)."""
        src_path = str(src)
        if operator is None and src_path.startswith(("http://", "https://")):
            return self.upload_url(src_path, name=dst_name, size_mb=size_mb, force_upload=force_upload)["iqn"]
        return self.upload(dst_name, src, size_mb=int(size_mb), force=force_upload, operator=operator)["iqn"]

    def upload_url(
        self,
        url: str,
        headers: List[str] | Dict[str, str] | None = None,
        name: Optional[str] = None,
        size_mb: int = 0,
        force_upload: bool = False,
    ) -> Dict[str, Any]:
        """Have the exporter download an http(s) image itself (with optional `Name: value`
        headers) and export it; returns {name, address, iqn, lun_id, bytes, sha256, skipped}."""
        return integers(self.call("upload_url", url, parse_headers(headers), name, size_mb, force_upload))

    def cli(self):
        base = super().cli()

        @base.command()
        @click.argument("file", type=str)
        @click.option("--name", "name", "-n", type=str, help="LUN name (defaults to basename without extension)")
        @click.option("--size-mb", type=int, default=0, show_default=True, help="LUN size in MiB (0: the image's)")
        @click.option(
            "--force-upload",
            is_flag=True,
            default=False,
            help="Force uploading even if the file appears identical on the exporter",
        )
        @click.option(
            "--header",
            "headers",
            multiple=True,
            help="Custom HTTP header in 'Key: Value' format. Repeatable.",
        )
        def serve(file: str, name: Optional[str], size_mb: int, force_upload: bool, headers: tuple[str, ...]):
            """Serve an image as an iSCSI LUN from a local path or HTTP(S) URL (other LUNs stay)."""
            try:
                header_list = parse_headers(headers)
            except ValueError as e:
                raise click.ClickException(str(e)) from None
            self.start()
            if not name:
                name = name_from_file(file)
            if file.startswith(("http://", "https://")):
                result = self.upload_url(file, header_list, name, size_mb, force_upload)
            else:
                result = self.upload(name, file, size_mb=size_mb, force=force_upload)
            click.echo(f"{self.get_host()}:{self.get_port()} {result['iqn']}")

        return base
