"""Artifact chunks on the wire: a fixed binary header, then the raw bytes.

Chunks are the one binary payload of the protocol (everything else is JSON):
a blob is large, and base64 inside JSON made every chunk a third bigger and
slow to decode. A frame is a :data:`HEADER_BYTES` header (network byte order)
followed by its body:

======  =====  ==============================================================
offset  bytes  field
======  =====  ==============================================================
0       2      magic ``b"EF"``
2       1      format version, :data:`FORMAT_VERSION` (1)
3       1      kind: 1 data, 2 refusal
4       1      flags: bit 0 :data:`FLAG_FINAL` on data (the controller has
               nothing more scheduled for this blob); every other bit 0
5       3      reserved, zero
8       32     the blob's sha256, raw
40      8      offset of the body in the blob (data; 0 for a refusal)
48      8      the blob's total size in bytes (data; 0 for a refusal)
56      4      body length in bytes
60      ...    body: the blob's bytes at ``offset`` (data), or a one-line
               UTF-8 reason (refusal)
======  =====  ==============================================================

:func:`decode_frame` checks every field and length before anything else sees
the frame and raises :class:`~shared.errors.DecodeError` (one line) on any
mismatch. A well-formed frame is not a trusted one: the blob is believed only
once its whole content hashes to the sha256 of a release-signed manifest.

Byte ranges (``offset``, ``length``) are what a node asks for; the helpers
here keep them sorted, disjoint and inside a blob.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from shared.errors import DecodeError

__all__ = [
    "FLAG_FINAL",
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_BLOB_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_REASON_BYTES",
    "Chunk",
    "Frame",
    "Refusal",
    "clamp_ranges",
    "decode_frame",
    "encode_chunk",
    "encode_refusal",
]

MAGIC = b"EF"
FORMAT_VERSION = 1
FLAG_FINAL = 0x01
MAX_CHUNK_BYTES = 1024 * 1024
"""Largest body of a data frame (bytes); below the broker's 2 MiB payload limit."""
MAX_BLOB_BYTES = 2**48
"""Largest blob a frame may describe (bytes): 256 TiB, far above any model."""
MAX_REASON_BYTES = 512

_KIND_DATA = 1
_KIND_REFUSAL = 2
_HEADER = struct.Struct("!2sBBB3s32sQQI")
HEADER_BYTES = _HEADER.size  # 60
_RESERVED = b"\x00\x00\x00"


@dataclass(frozen=True, slots=True)
class Chunk:
    """``data`` is blob ``sha256`` (``total`` bytes in all) from ``offset`` on.

    ``final``: the sender has nothing more scheduled for this blob after it.
    """

    sha256: str
    offset: int
    total: int
    data: bytes
    final: bool = False

    @property
    def end(self) -> int:
        return self.offset + len(self.data)


@dataclass(frozen=True, slots=True)
class Refusal:
    """The sender cannot serve blob ``sha256`` (it does not hold it)."""

    sha256: str
    reason: str


Frame = Chunk | Refusal


def _sha_bytes(sha256: str) -> bytes:
    if len(sha256) != 64 or sha256 != sha256.lower():
        raise ValueError(f"invalid sha256 {sha256!r}")
    return bytes.fromhex(sha256)


def encode_chunk(
    sha256: str, offset: int, total: int, data: bytes, *, final: bool = False
) -> bytes:
    """The frame of one data chunk.

    Raises:
        ValueError: an invalid digest, an empty or oversize body, or a body
            that does not lie inside the blob.
    """
    if not 1 <= len(data) <= MAX_CHUNK_BYTES:
        raise ValueError(f"a chunk holds 1 to {MAX_CHUNK_BYTES} bytes, not {len(data)}")
    if offset < 0 or offset + len(data) > total or total > MAX_BLOB_BYTES:
        raise ValueError(f"{len(data)} bytes at offset {offset} do not fit a blob of {total}")
    flags = FLAG_FINAL if final else 0
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        _KIND_DATA,
        flags,
        _RESERVED,
        _sha_bytes(sha256),
        offset,
        total,
        len(data),
    )
    return header + data


def encode_refusal(sha256: str, reason: str) -> bytes:
    """The frame saying blob ``sha256`` cannot be served; ``reason`` is cut to one line.

    Raises:
        ValueError: an invalid digest.
    """
    text = " ".join(reason.split()) or "refused"
    body = text.encode()[:MAX_REASON_BYTES].decode(errors="ignore").encode()
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, _KIND_REFUSAL, 0, _RESERVED, _sha_bytes(sha256), 0, 0, len(body)
    )
    return header + body


class _Fields(NamedTuple):
    magic: bytes
    version: int
    kind: int
    flags: int
    reserved: bytes
    sha: bytes
    offset: int
    total: int
    length: int


def decode_frame(payload: bytes) -> Frame:
    """The frame in ``payload``, every field checked.

    Raises:
        DecodeError: a short or long payload, a wrong magic, version, kind,
            flag or reserved byte, a body length that differs from the payload,
            an empty or oversize body, a body outside the blob, or a refusal
            whose reason is not one line of UTF-8.
    """
    if len(payload) < HEADER_BYTES:
        raise DecodeError(f"chunk frame of {len(payload)} bytes is shorter than its header")
    fields = _Fields._make(_HEADER.unpack_from(payload))
    if fields.magic != MAGIC:
        raise DecodeError("not a chunk frame (wrong magic)")
    if fields.version != FORMAT_VERSION:
        raise DecodeError(f"chunk frame version {fields.version} is not {FORMAT_VERSION}")
    if fields.reserved != _RESERVED:
        raise DecodeError("chunk frame has non-zero reserved bytes")
    carried = len(payload) - HEADER_BYTES
    if fields.length != carried:
        raise DecodeError(f"chunk frame declares {fields.length} body bytes but carries {carried}")
    if fields.kind == _KIND_DATA:
        return _data(payload, fields)
    if fields.kind == _KIND_REFUSAL:
        return _refusal(payload, fields)
    raise DecodeError(f"unknown chunk frame kind {fields.kind}")


def _data(payload: bytes, fields: _Fields) -> Chunk:
    offset, total, length = fields.offset, fields.total, fields.length
    if fields.flags & ~FLAG_FINAL:
        raise DecodeError(f"unknown chunk frame flags {fields.flags:#04x}")
    if not 1 <= length <= MAX_CHUNK_BYTES:
        raise DecodeError(f"chunk body of {length} bytes is outside 1..{MAX_CHUNK_BYTES}")
    if total > MAX_BLOB_BYTES:
        raise DecodeError(f"blob size {total} is over {MAX_BLOB_BYTES}")
    if offset + length > total:
        raise DecodeError(f"chunk of {length} bytes at {offset} ends past the blob ({total})")
    final = bool(fields.flags & FLAG_FINAL)
    return Chunk(fields.sha.hex(), offset, total, payload[HEADER_BYTES:], final)


def _refusal(payload: bytes, fields: _Fields) -> Refusal:
    if fields.flags or fields.offset or fields.total:
        raise DecodeError("refusal frame with flags, offset or size set")
    if not 1 <= fields.length <= MAX_REASON_BYTES:
        raise DecodeError(
            f"refusal reason of {fields.length} bytes is outside 1..{MAX_REASON_BYTES}"
        )
    try:
        reason = payload[HEADER_BYTES:].decode()
    except UnicodeDecodeError:
        raise DecodeError("refusal reason is not UTF-8") from None
    if not reason.isprintable():
        raise DecodeError("refusal reason is not one printable line")
    return Refusal(fields.sha.hex(), reason)


def clamp_ranges(ranges: Iterable[Sequence[int]], size: int) -> list[tuple[int, int]]:
    """``(offset, length)`` ranges cut to ``[0, size)``, sorted and merged; empty ones dropped."""
    spans = sorted(
        (max(0, offset), min(size, offset + length))
        for offset, length in ranges
        if offset < size and length > 0
    )
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        elif end > start:
            merged.append([start, end])
    return [(start, end - start) for start, end in merged]
