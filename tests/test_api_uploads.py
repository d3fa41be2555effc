"""The streaming multipart reader: exact cap, nothing left behind, small fields kept, malformed bodies refused."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.api.uploads import (
    UploadError,
    UploadTooLarge,
    content_length_too_large,
    receive_upload,
)

BOUNDARY = "pgolf-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def multipart(parts: list[tuple[str, bytes, bool]]) -> bytes:
    """(name, content, is_file) parts as one multipart/form-data body."""
    body = b""
    for name, content, is_file in parts:
        filename = f'; filename="{name}.bin"' if is_file else ""
        body += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{filename}\r\n\r\n").encode()
        body += content + b"\r\n"
    return body + f"--{BOUNDARY}--\r\n".encode()


async def chunks(body: bytes, size: int = 7919) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):  # an odd chunk size splits boundaries across chunks
        yield body[start:start + size]


def receive(body: bytes, scratch: Path, cap: int, content_type: str = CONTENT_TYPE):
    return asyncio.run(receive_upload(chunks(body), content_type, scratch, cap))


def test_artifact_at_the_cap_is_kept_with_its_hash_and_fields(tmp_path: Path) -> None:
    artifact = bytes(range(256)) * 100  # 25,600 bytes, containing CR LF and dashes
    body = multipart([("ttt", b"true", False), ("artifact", artifact, True), ("ngram", b"exact", False)])
    upload = receive(body, tmp_path, cap=len(artifact))
    assert upload.size_bytes == len(artifact)
    assert upload.sha256 == hashlib.sha256(artifact).hexdigest()
    assert upload.path.read_bytes() == artifact
    assert upload.fields == {"ttt": "true", "ngram": "exact"}
    upload.discard()
    assert list(tmp_path.iterdir()) == []


def test_one_byte_over_the_cap_is_cut_off_and_nothing_stays(tmp_path: Path) -> None:
    artifact = b"x" * 25_601
    with pytest.raises(UploadTooLarge, match="25,600"):
        receive(multipart([("artifact", artifact, True)]), tmp_path, cap=25_600)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (multipart([("ttt", b"true", False)]), CONTENT_TYPE, "no 'artifact'"),
        (multipart([("artifact", b"a", True), ("artifact", b"b", True)]), CONTENT_TYPE, "exactly one"),
        (multipart([("artifact", b"a", True), ("note", b"n" * 2000, False)]), CONTENT_TYPE, "longer than"),
        (b"artifact=abc", "application/x-www-form-urlencoded", "multipart/form-data"),
        (b"--other\r\nContent-Disposition: form-data; name=\"artifact\"\r\n\r\nabc", CONTENT_TYPE, "malformed"),
    ],
)
def test_malformed_uploads_are_refused_without_leftovers(
    tmp_path: Path, body: bytes, content_type: str, message: str
) -> None:
    with pytest.raises(UploadError, match=message):
        receive(body, tmp_path, cap=1000, content_type=content_type)
    assert [p for p in tmp_path.iterdir() if p.is_file()] == []


def test_declared_length_far_over_the_cap_is_refused_before_reading() -> None:
    assert content_length_too_large(str(16_000_000 + 10 * 1024 * 1024), 16_000_000)
    assert not content_length_too_large(str(16_000_000 + 300), 16_000_000)  # framing: decided while streaming
    assert not content_length_too_large(None, 16_000_000)
