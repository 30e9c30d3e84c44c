"""Tests for :mod:`snet_daemon.frontend.wire`: gRPC framing without I/O."""

from __future__ import annotations

import gzip
import zlib

import pytest

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import (
    MessageDecoder,
    check_encoding,
    decode_bin,
    decode_message,
    encode_bin,
    encode_message,
    encode_timeout,
    frame,
    is_grpc_content_type,
    metadata_from_headers,
    metadata_to_headers,
    parse_timeout,
    status_headers,
)


def test_frame_prefixes_flag_and_length() -> None:
    """A message is framed as flag 0, a 4-byte big-endian length, the bytes."""
    assert frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert frame(b"") == b"\x00\x00\x00\x00\x00"


def test_decoder_refuses_more_messages_than_allowed_in_one_feed() -> None:
    """With ``max_messages``, one feed returns at most that many messages; one more is
    RESOURCE_EXHAUSTED (a body of a million empty messages must not be split at all)."""
    assert MessageDecoder(100, max_messages=3).feed(frame(b"") * 3) == [b""] * 3
    with pytest.raises(GrpcError) as info:
        MessageDecoder(100, max_messages=3).feed(frame(b"") * 4)
    assert info.value.status == Status.RESOURCE_EXHAUSTED
    assert len(MessageDecoder(100).feed(frame(b"") * 5000)) == 5000


def test_decoder_whole_message_in_one_chunk() -> None:
    """The fast path returns a message that arrives in exactly one chunk."""
    decoder = MessageDecoder(100)
    assert decoder.feed(frame(b"hello")) == [b"hello"]
    assert decoder.at_boundary()


def test_decoder_reassembles_split_and_joined_messages() -> None:
    """Messages split across chunks, and several in one chunk, all come out once."""
    data = frame(b"one") + frame(b"") + frame(b"three")
    for cut in range(len(data) + 1):
        decoder = MessageDecoder(100)
        out = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert out == [b"one", b"", b"three"], cut
        assert decoder.at_boundary()


def test_decoder_byte_by_byte() -> None:
    """Feeding one byte at a time still yields each message when it completes."""
    decoder = MessageDecoder(100)
    out: list[bytes] = []
    for byte in frame(b"xy") + frame(b"z"):
        out += decoder.feed(bytes([byte]))
    assert out == [b"xy", b"z"]


def test_decoder_reports_partial_message() -> None:
    """A stream that stops mid-message is not at a message boundary."""
    decoder = MessageDecoder(100)
    assert decoder.feed(frame(b"abcdef")[:7]) == []
    assert not decoder.at_boundary()
    assert decoder.pending == 7


def test_decoder_rejects_oversized_message_from_its_prefix() -> None:
    """A length prefix beyond the limit fails at once, before the body arrives."""
    decoder = MessageDecoder(10)
    with pytest.raises(GrpcError) as info:
        decoder.feed(b"\x00\x00\x00\x00\x0b")
    assert info.value.status == Status.RESOURCE_EXHAUSTED
    assert "11 vs. 10" in info.value.message


def test_decoder_accepts_message_at_the_limit() -> None:
    """A message exactly at the size limit is accepted."""
    assert MessageDecoder(3).feed(frame(b"abc")) == [b"abc"]


def test_compressed_flag_without_encoding_is_internal_error() -> None:
    """The compressed flag with identity encoding is a protocol error (INTERNAL)."""
    decoder = MessageDecoder(100)
    with pytest.raises(GrpcError) as info:
        decoder.feed(b"\x01\x00\x00\x00\x01x")
    assert info.value.status == Status.INTERNAL
    assert "grpc-encoding" in info.value.message


def test_unknown_flag_bits_are_rejected() -> None:
    """Flag bits other than compression are invalid."""
    with pytest.raises(GrpcError) as info:
        MessageDecoder(100).feed(b"\x02\x00\x00\x00\x01x")
    assert info.value.status == Status.INTERNAL


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress)],
)
def test_compressed_messages_are_decompressed(encoding: str, compress: object) -> None:
    """gzip and deflate request messages are decompressed."""
    payload = compress(b"hello world" * 10)  # type: ignore[operator]
    message = b"\x01" + len(payload).to_bytes(4, "big") + payload
    assert MessageDecoder(1000, encoding).feed(message) == [b"hello world" * 10]


def test_decompressed_size_is_limited() -> None:
    """A small compressed message that inflates beyond the limit is refused."""
    payload = gzip.compress(b"\x00" * 10_000)
    message = b"\x01" + len(payload).to_bytes(4, "big") + payload
    with pytest.raises(GrpcError) as info:
        MessageDecoder(1000, "gzip").feed(message)
    assert info.value.status == Status.RESOURCE_EXHAUSTED


def test_decompression_bomb_is_refused_without_inflating_it() -> None:
    """A 64 KB message that would inflate to 64 MB is refused after inflating about the limit."""
    import tracemalloc

    payload = zlib.compress(b"\x00" * (64 << 20), 9)
    message = b"\x01" + len(payload).to_bytes(4, "big") + payload
    tracemalloc.start()
    try:
        with pytest.raises(GrpcError) as info:
            MessageDecoder(1 << 20, "deflate").feed(message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status == Status.RESOURCE_EXHAUSTED
    assert info.value.message == f"received message after decompression larger than max ({1 << 20})"
    assert peak < 8 << 20


def test_gzip_members_and_truncation() -> None:
    """Concatenated gzip members are one message; a truncated stream or trailing bytes are refused."""
    payload = gzip.compress(b"abc") + gzip.compress(b"def")
    message = b"\x01" + len(payload).to_bytes(4, "big") + payload
    assert MessageDecoder(1000, "gzip").feed(message) == [b"abcdef"]
    for encoding, bad in [("gzip", gzip.compress(b"abc")[:-3]), ("deflate", zlib.compress(b"abc") + b"x")]:
        with pytest.raises(GrpcError) as info:
            MessageDecoder(1000, encoding).feed(b"\x01" + len(bad).to_bytes(4, "big") + bad)
        assert info.value.status == Status.INTERNAL


def test_corrupt_compressed_message() -> None:
    """A message that does not decompress fails with INTERNAL."""
    with pytest.raises(GrpcError) as info:
        MessageDecoder(1000, "gzip").feed(b"\x01\x00\x00\x00\x03abc")
    assert info.value.status == Status.INTERNAL


def test_check_encoding() -> None:
    """identity/gzip/deflate are accepted; others are UNIMPLEMENTED."""
    assert check_encoding(None) == "identity"
    assert check_encoding("identity") == "identity"
    assert check_encoding("gzip") == "gzip"
    with pytest.raises(GrpcError) as info:
        check_encoding("snappy")
    assert info.value.status == Status.UNIMPLEMENTED


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("1H", 3600.0),
        ("2M", 120.0),
        ("3S", 3.0),
        ("100m", 0.1),
        ("5u", 5e-6),
        ("7n", 7e-9),
        ("99999999S", 99999999.0),
    ],
)
def test_parse_timeout(value: str, seconds: float) -> None:
    """Every grpc-timeout unit parses to seconds."""
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "10", "S", "123456789S", "1.5S", "-1S", "1s", "1x"])
def test_parse_timeout_rejects_malformed(value: str) -> None:
    """Malformed grpc-timeout values are INVALID_ARGUMENT."""
    with pytest.raises(GrpcError) as info:
        parse_timeout(value)
    assert info.value.status == Status.INVALID_ARGUMENT


@pytest.mark.parametrize("seconds", [0.0, 1e-9, 0.5, 1.0, 59.9, 3600.0, 1e9])
def test_encode_timeout_round_trips(seconds: float) -> None:
    """An encoded timeout parses back to at least the original value."""
    value = encode_timeout(seconds)
    assert parse_timeout(value) >= seconds * 0.999999
    assert len(value) <= 9


@pytest.mark.parametrize("raw", [b"", b"\x00", b"\x00\x01", b"\x00\x01\x02", bytes(range(65))])
def test_bin_metadata_padded_and_unpadded(raw: bytes) -> None:
    """-bin values decode with or without base64 padding."""
    unpadded = encode_bin(raw)
    assert "=" not in unpadded
    assert decode_bin(unpadded) == raw
    padded = unpadded + "=" * (-len(unpadded) % 4)
    assert decode_bin(padded) == raw


def test_bin_metadata_urlsafe_alphabet() -> None:
    """URL-safe base64 is accepted too."""
    assert decode_bin("-_8") == b"\xfb\xff"


def test_bin_metadata_garbage() -> None:
    """A -bin value that is not base64 is INVALID_ARGUMENT."""
    with pytest.raises(GrpcError) as info:
        decode_bin("not base64 !!")
    assert info.value.status == Status.INVALID_ARGUMENT


def test_metadata_from_headers_drops_transport_headers() -> None:
    """Pseudo-headers and hop/transport headers never become metadata."""
    headers = [
        (":path", "/a.B/C"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "1S"),
        ("user-agent", "x"),
        ("x-custom", "v"),
        ("snet-payment-channel-signature-bin", encode_bin(b"\x01\x02")),
    ]
    assert metadata_from_headers(headers) == (
        ("x-custom", "v"),
        ("snet-payment-channel-signature-bin", b"\x01\x02"),
    )


def test_metadata_to_headers() -> None:
    """Metadata becomes header pairs with -bin values base64 (unpadded)."""
    pairs = list(
        metadata_to_headers(
            [("x-a", "1"), ("x-b-bin", b"\xff"), ("grpc-status", "0"), ("content-type", "x"), ("X-Up", "y")]
        )
    )
    assert pairs == [("x-a", "1"), ("x-b-bin", "/w"), ("x-up", "y")]


def test_grpc_message_percent_encoding_round_trip() -> None:
    """Status messages are percent-encoded outside printable ASCII, and decode back."""
    for text in ["plain text", "100% sure", "naïve ☃", "line\nbreak", ""]:
        encoded = encode_message(text)
        assert all(0x20 <= ord(c) < 0x7F for c in encoded)
        assert decode_message(encoded) == text
    assert encode_message("100%") == "100%25"


def test_decode_message_keeps_malformed_escapes() -> None:
    """A stray percent sign that is not an escape is kept."""
    assert decode_message("50%zz") == "50%zz"
    assert decode_message("end%") == "end%"


def test_status_headers() -> None:
    """grpc-message is only sent when there is a message."""
    assert status_headers(0, "") == [("grpc-status", "0")]
    assert status_headers(5, "not found") == [("grpc-status", "5"), ("grpc-message", "not found")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/grpc", True),
        ("application/grpc+proto", True),
        ("application/grpc+json", True),
        ("application/grpc;charset=utf-8", True),
        ("application/grpc-web", False),
        ("application/grpcx", False),
        ("text/plain", False),
        ("", False),
    ],
)
def test_is_grpc_content_type(value: str, expected: bool) -> None:
    """Native gRPC content types are recognised; gRPC-Web ones are not."""
    assert is_grpc_content_type(value) is expected


def test_a_status_message_that_is_no_unicode_is_still_sent() -> None:
    """A lone surrogate (from a service's JSON) becomes ``?`` instead of failing the status, which
    is encoded after the call counts as finished: no trailers went out and the client hung."""
    assert encode_message("bad \ud800 input") == "bad ? input"
    assert encode_message("na\u00efve \udfff") == "na%C3%AFve ?"
    assert status_headers(3, "x\ud800") == [("grpc-status", "3"), ("grpc-message", "x?")]
