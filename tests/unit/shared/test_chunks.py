"""The binary chunk frame (round trips, every malformed header refused in one line) and
the artifact request that asks for byte ranges."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.chunks import (
    FLAG_FINAL,
    HEADER_BYTES,
    MAGIC,
    MAX_BLOB_BYTES,
    MAX_CHUNK_BYTES,
    MAX_REASON_BYTES,
    Chunk,
    Refusal,
    clamp_ranges,
    decode_frame,
    encode_chunk,
    encode_refusal,
)
from shared.errors import DecodeError
from shared.messages import MAX_REQUEST_RANGES, ArtifactRequest, decode, encode

SHA = "ab" * 32
HEADER = struct.Struct("!2sBBB3s32sQQI")


def frame(
    *,
    magic: bytes = b"EF",
    version: int = 1,
    kind: int = 1,
    flags: int = 0,
    reserved: bytes = b"\0\0\0",
    offset: int = 0,
    total: int = 10,
    length: int | None = None,
    body: bytes = b"0123456789",
) -> bytes:
    declared = len(body) if length is None else length
    sha = bytes.fromhex(SHA)
    return HEADER.pack(magic, version, kind, flags, reserved, sha, offset, total, declared) + body


def test_header_is_sixty_bytes_and_the_sketch_above_matches_the_encoder() -> None:
    assert HEADER_BYTES == HEADER.size == 60
    assert encode_chunk(SHA, 0, 10, b"0123456789") == frame()
    assert encode_chunk(SHA, 0, 10, b"0123456789", final=True) == frame(flags=FLAG_FINAL)


@given(
    data=st.binary(min_size=1, max_size=4096),
    offset=st.integers(0, 2**40),
    extra=st.integers(0, 2**20),
    final=st.booleans(),
)
def test_chunk_round_trip(data: bytes, offset: int, extra: int, final: bool) -> None:
    total = offset + len(data) + extra
    decoded = decode_frame(encode_chunk(SHA, offset, total, data, final=final))
    assert decoded == Chunk(SHA, offset, total, data, final)
    assert isinstance(decoded, Chunk)
    assert decoded.end == offset + len(data)


def test_refusal_round_trip_is_one_line_and_bounded() -> None:
    refused = decode_frame(encode_refusal(SHA, "no blob\nhere\t at all"))
    assert refused == Refusal(SHA, "no blob here at all")
    long = decode_frame(encode_refusal(SHA, "é" * 1_000))
    assert isinstance(long, Refusal)
    assert len(long.reason.encode()) <= MAX_REASON_BYTES


MALFORMED: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "shorter than its header"),
    ("short header", lambda: frame()[:59], "shorter than its header"),
    ("wrong magic", lambda: frame(magic=b"EG"), "wrong magic"),
    ("json", lambda: b'{"type":"artifact_chunk"}' + b" " * 60, "wrong magic"),
    ("version 0", lambda: frame(version=0), "version 0"),
    ("version 2", lambda: frame(version=2), "version 2"),
    ("kind 0", lambda: frame(kind=0), "kind 0"),
    ("kind 3", lambda: frame(kind=3), "kind 3"),
    ("unknown flag", lambda: frame(flags=0x02), "flags"),
    ("all flags", lambda: frame(flags=0xFF), "flags"),
    ("reserved set", lambda: frame(reserved=b"\0\1\0"), "reserved"),
    ("body longer than declared", lambda: frame(length=9), "declares 9 body bytes"),
    ("body shorter than declared", lambda: frame(length=11), "declares 11 body bytes"),
    ("trailing byte", lambda: frame() + b"x", "carries 11"),
    ("empty body", lambda: frame(body=b"", total=10), "outside 1.."),
    (
        "oversize body",
        lambda: frame(body=b"x" * (MAX_CHUNK_BYTES + 1), total=2 * MAX_CHUNK_BYTES),
        "outside 1..",
    ),
    ("past the end", lambda: frame(offset=1, total=10), "ends past the blob"),
    ("offset beyond size", lambda: frame(offset=2**63, total=2**63), "over"),
    ("huge offset wraps nothing", lambda: frame(offset=2**64 - 1, total=10), "past the blob"),
    ("blob too big", lambda: frame(total=MAX_BLOB_BYTES + 1), "over"),
    ("refusal with offset", lambda: frame(kind=2, offset=1, total=0, body=b"x"), "refusal"),
    ("refusal with size", lambda: frame(kind=2, total=5, body=b"x"), "refusal"),
    ("refusal with flags", lambda: frame(kind=2, flags=1, total=0, body=b"x"), "refusal"),
    ("refusal without reason", lambda: frame(kind=2, total=0, body=b""), "outside 1.."),
    (
        "refusal too long",
        lambda: frame(kind=2, total=0, body=b"x" * (MAX_REASON_BYTES + 1)),
        "outside 1..",
    ),
    ("refusal not utf-8", lambda: frame(kind=2, total=0, body=b"\xff\xfe"), "not UTF-8"),
    ("refusal two lines", lambda: frame(kind=2, total=0, body=b"a\nb"), "one printable line"),
]


@pytest.mark.parametrize(
    ("payload", "message"),
    [pytest.param(build, message, id=name) for name, build, message in MALFORMED],
)
def test_malformed_frames_are_refused_in_one_line(
    payload: Callable[[], bytes], message: str
) -> None:
    with pytest.raises(DecodeError, match=message) as info:
        decode_frame(payload())
    assert "\n" not in str(info.value)


@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_error(payload: bytes) -> None:
    error: DecodeError | None = None
    try:
        frame = decode_frame(payload)
    except DecodeError as exc:
        error = exc
    if error is not None:
        assert "\n" not in str(error)
    else:  # only a well-formed frame decodes
        assert isinstance(frame, Chunk | Refusal)
        assert payload[:2] == MAGIC
        assert len(payload) >= HEADER_BYTES


@given(st.integers(0, HEADER_BYTES - 1), st.integers(0, 7))
def test_a_flipped_header_bit_is_refused_or_decodes_to_a_consistent_frame(
    position: int, bit: int
) -> None:
    good = bytearray(encode_chunk(SHA, 0, 10, b"0123456789"))
    good[position] ^= 1 << bit
    try:
        decoded = decode_frame(bytes(good))
    except DecodeError:
        return
    # The flips that still parse change only the digest, the offset/size or the final flag.
    assert isinstance(decoded, Chunk)
    assert decoded.end <= decoded.total


@pytest.mark.parametrize(
    ("data", "offset", "total"),
    [(b"", 0, 10), (b"x" * (MAX_CHUNK_BYTES + 1), 0, 2**30), (b"abc", 8, 10), (b"a", -1, 10)],
)
def test_encoder_refuses_chunks_that_would_not_decode(data: bytes, offset: int, total: int) -> None:
    with pytest.raises(ValueError, match=r"chunk holds|do not fit"):
        encode_chunk(SHA, offset, total, data)


@pytest.mark.parametrize("bad", ["AB" * 32, "ab" * 31, "zz" * 32])
def test_encoder_refuses_bad_digests(bad: str) -> None:
    with pytest.raises(ValueError, match=r"sha256|non-hexadecimal"):
        encode_chunk(bad, 0, 1, b"x")


@pytest.mark.parametrize(
    ("ranges", "size", "expected"),
    [
        ([(0, 10)], 5, [(0, 5)]),
        ([(5, 2), (0, 3)], 100, [(0, 3), (5, 2)]),
        ([(0, 3), (3, 3)], 100, [(0, 6)]),
        ([(0, 5), (2, 1)], 100, [(0, 5)]),
        ([(10, 5)], 10, []),
        ([(0, 0)], 10, []),
        ([(-4, 6)], 10, [(0, 2)]),
    ],
)
def test_clamp_ranges(
    ranges: list[tuple[int, int]], size: int, expected: list[tuple[int, int]]
) -> None:
    assert clamp_ranges(ranges, size) == expected


# ----- the request: byte ranges a node lacks ---------------------------------------------


def _request(ranges: Any, **extra: Any) -> bytes:
    fields = {"v": 2, "type": "artifact_request", "node": "n", "sha256": SHA, "ts": 1.5}
    return json.dumps({**fields, "ranges": ranges, **extra}).encode()


def test_a_request_carries_sorted_disjoint_ranges() -> None:
    request = decode(ArtifactRequest, _request([[0, 10], [10, 5], [100, 1]]))
    assert request.ranges == ((0, 10), (10, 5), (100, 1))
    assert decode(ArtifactRequest, encode(request)) == request


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_request([]), id="no-ranges"),
        pytest.param(_request([[0, 10], [5, 10]]), id="overlapping"),
        pytest.param(_request([[20, 10], [0, 10]]), id="unsorted"),
        pytest.param(_request([[0, 0]]), id="empty-range"),
        pytest.param(_request([[-1, 10]]), id="negative-offset"),
        pytest.param(_request([[0, 10, 20]]), id="not-a-pair"),
        pytest.param(_request([[0, 2**64]]), id="huge-length"),
        pytest.param(_request([[2 * i, 1] for i in range(MAX_REQUEST_RANGES + 1)]), id="too-many"),
        pytest.param(_request([[0, 10]], v=1), id="version-1"),
        pytest.param(_request([[0, 10]], request_id="q1"), id="version-1-field"),
        pytest.param(_request([[0, 10]]).replace(b'"node"', b'"node":"m","node"'), id="dup-key"),
    ],
)
def test_malformed_requests_are_refused(payload: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        decode(ArtifactRequest, payload)
    assert "\n" not in str(info.value)
