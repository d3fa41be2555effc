"""Streaming multipart upload: the artifact goes to disk chunk by chunk and is cut off at the cap.

Starlette's `request.form()` would spool the whole file before the route sees a byte, so the size check would
come after the bytes were taken. Here the request body is fed through python-multipart's push parser as it
arrives: the file part is hashed and written to a scratch file, its length is counted exactly, and the moment
it passes the cap the scratch file is deleted and `UploadTooLarge` raised. Memory per upload is one network
chunk, whatever the number of concurrent uploads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.admission import UploadRefused
from service.api.storage import StorageFull

ARTIFACT_FIELD = "artifact"
# Upstream .ptz artifacts come with their submission's train_gpt.py, from which the model config is read. A real
# one is under 120 kB; the part is kept in memory and cut off past this.
CODE_FIELD = "code"
MAX_CODE_BYTES = 1_000_000
MAX_TEXT_FIELDS = 16
MAX_TEXT_FIELD_BYTES = 1024
# Multipart framing around the file (boundaries, part headers, option fields) stays far below this; a body
# declared larger than cap + overhead is refused before any of it is read.
MAX_FORM_OVERHEAD_BYTES = 64 * 1024
# After the cap is passed the rest of the body is read and thrown away, up to this much, so that an ordinary
# client gets to read the 413 instead of a connection reset; a longer body is simply cut.
DRAIN_LIMIT_BYTES = 1 << 20
# RFC 2046 section 5.1.1: 1 to 70 characters of this set, not ending in a space.
_BOUNDARY = re.compile(rb"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class UploadError(ValueError):
    """The request body is not a usable multipart upload (HTTP 400)."""


class UploadTooLarge(UploadError):
    """The artifact passed the cap (HTTP 413). Nothing of it is left on disk."""

    def __init__(self, cap_bytes: int) -> None:
        super().__init__(f"artifact exceeds the cap of {cap_bytes:,} bytes; upload cut off and discarded")
        self.cap_bytes = cap_bytes


@dataclass
class CodeTooLarge(UploadTooLarge):
    """The code part passed MAX_CODE_BYTES (HTTP 413)."""

    def __init__(self) -> None:
        ValueError.__init__(self, f"the code part exceeds {MAX_CODE_BYTES:,} bytes; upload discarded")
        self.cap_bytes = MAX_CODE_BYTES


@dataclass
class Upload:
    """An artifact safely on disk, with its exact size and sha256, plus the small text fields of the form."""

    path: Path
    size_bytes: int
    sha256: str
    fields: dict[str, str] = field(default_factory=dict)
    code: bytes | None = None  # the optional 'code' part (an upstream submission's train_gpt.py)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def max_body_bytes(cap_bytes: int) -> int:
    """The longest request body an artifact of `cap_bytes` can need (with an upstream submission's code part),
    framing included, chunked or not."""
    return cap_bytes + MAX_CODE_BYTES + MAX_FORM_OVERHEAD_BYTES


def content_length_too_large(content_length: str | None, cap_bytes: int) -> bool:
    """True when the declared body size alone proves the artifact is over the cap."""
    if content_length is None or not re.fullmatch(r"[0-9]{1,19}", content_length):
        return False
    return int(content_length) > max_body_bytes(cap_bytes)


class _FormCollector:
    """python-multipart callbacks: route the artifact part to a file, keep small text fields in memory."""

    def __init__(self, artifact_file: BinaryIO, cap_bytes: int) -> None:
        self.artifact_file = artifact_file
        self.cap_bytes = cap_bytes
        self.fields: dict[str, str] = {}
        self.artifact_size = 0
        self.artifact_parts = 0
        self.digest = hashlib.sha256()
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._part_name: str | None = None
        self._part_is_file = False
        self._text = bytearray()
        self.code: bytearray | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._on_part_begin,
            "on_header_field": lambda data, start, end: self._header_field.extend(data[start:end]),
            "on_header_value": lambda data, start, end: self._header_value.extend(data[start:end]),
            "on_header_end": self._on_header_end,
            "on_headers_finished": self._on_headers_finished,
            "on_part_data": self._on_part_data,
            "on_part_end": self._on_part_end,
        }

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_is_file = False
        self._text = bytearray()

    def _on_header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        disposition, params = parse_options_header(self._headers.get("content-disposition"))
        if disposition != b"form-data" or b"name" not in params:
            raise UploadError("every multipart part needs 'Content-Disposition: form-data; name=...'")
        self._part_name = params[b"name"].decode("utf-8", "replace")
        if self._part_name == ARTIFACT_FIELD:
            self.artifact_parts += 1
            if self.artifact_parts > 1:
                raise UploadError(f"send exactly one '{ARTIFACT_FIELD}' part")
            self._part_is_file = True
        elif self._part_name == CODE_FIELD:
            if self.code is not None:
                raise UploadError(f"send at most one '{CODE_FIELD}' part")
            self.code = bytearray()
        elif len(self.fields) >= MAX_TEXT_FIELDS:
            raise UploadError(f"too many form fields (at most {MAX_TEXT_FIELDS})")

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_is_file:
            self.artifact_size += end - start
            if self.artifact_size > self.cap_bytes:
                raise UploadTooLarge(self.cap_bytes)
            chunk = memoryview(data)[start:end]  # no copy of the network chunk
            self.digest.update(chunk)
            self.artifact_file.write(chunk)
        elif self._part_name == CODE_FIELD and self.code is not None:
            self.code.extend(data[start:end])
            if len(self.code) > MAX_CODE_BYTES:
                raise CodeTooLarge()
        else:
            self._text.extend(data[start:end])
            if len(self._text) > MAX_TEXT_FIELD_BYTES:
                raise UploadError(f"form field '{self._part_name}' is longer than {MAX_TEXT_FIELD_BYTES} bytes")

    def _on_part_end(self) -> None:
        if not self._part_is_file and self._part_name not in (None, CODE_FIELD):
            self.fields[self._part_name] = self._text.decode("utf-8", "replace")


async def receive_upload(
    body: AsyncIterator[bytes], content_type: str | None, scratch_dir: Path, cap_bytes: int
) -> Upload:
    """Stream a multipart/form-data body to a scratch file in `scratch_dir`.

    Raises UploadTooLarge the moment the artifact part passes `cap_bytes`, UploadError for anything malformed;
    in both cases the scratch file is already gone.
    """
    media_type, params = parse_options_header(content_type)
    if media_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise UploadError("send the artifact as multipart/form-data with a field named 'artifact'")
    if not _BOUNDARY.fullmatch(params[b"boundary"]):
        raise UploadError("the multipart boundary must be 1 to 70 characters of the set RFC 2046 allows")
    try:
        scratch_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=scratch_dir)
    except OSError as error:
        raise _disk_error(error) from None
    path = Path(name)
    try:
        try:
            with os.fdopen(handle, "wb") as artifact_file:
                collector = _FormCollector(artifact_file, cap_bytes)
                parser = MultipartParser(params[b"boundary"], collector.callbacks())
                try:
                    async for chunk in body:
                        parser.write(chunk)
                    parser.finalize()
                except UploadTooLarge:
                    artifact_file.close()
                    path.unlink(missing_ok=True)
                    await _drain(body, DRAIN_LIMIT_BYTES)
                    raise
                except (UploadError, OSError, UploadRefused):
                    raise
                except Exception as error:  # python-multipart's parse errors: the body is not valid multipart
                    raise UploadError(f"malformed multipart body: {error}") from None
        except OSError as error:  # writing or closing the scratch file: the disk, not the client
            raise _disk_error(error) from None
        if collector.artifact_parts == 0:
            raise UploadError(f"the form has no '{ARTIFACT_FIELD}' file part")
        code = None if collector.code is None else bytes(collector.code)
        return Upload(path, collector.artifact_size, collector.digest.hexdigest(), collector.fields, code)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def _disk_error(error: OSError) -> Exception:
    """A full disk is the service's condition (507), not a bad upload; any other OS error stays an error."""
    if error.errno in _DISK_FULL:
        return StorageFull(f"the service's upload space is full ({os.strerror(error.errno)}); the upload was "
                           "discarded, nothing was stored")
    return error


async def _drain(body: AsyncIterator[bytes], limit_bytes: int) -> None:
    drained = 0
    try:
        async for chunk in body:
            drained += len(chunk)
            if drained > limit_bytes:
                return
    except Exception:  # the client may already have gone; nothing to clean up
        return
