"""Tests for :mod:`snet_daemon.frontend.grpcweb` and :mod:`snet_daemon.frontend.cors`."""

from __future__ import annotations

import base64

import pytest

from snet_daemon.frontend.cors import CorsPolicy
from snet_daemon.frontend.grpcweb import TextDecoder, encode_text, parse_content_type, trailer_frame
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import frame


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/grpc-web", (False, "application/grpc-web")),
        ("application/grpc-web+proto", (False, "application/grpc-web+proto")),
        ("application/grpc-web-text", (True, "application/grpc-web-text")),
        ("application/grpc-web-text+proto", (True, "application/grpc-web-text+proto")),
        ("Application/GRPC-Web+proto; charset=utf-8", (False, "application/grpc-web+proto")),
        ("application/grpc", None),
        ("application/grpc-web+thrift", None),
        ("text/html", None),
    ],
)
def test_parse_content_type(value: str, expected: tuple[bool, str] | None) -> None:
    """gRPC-Web content types are classified as binary or text."""
    assert parse_content_type(value) == expected


def test_trailer_frame_layout() -> None:
    """Trailers are a 0x80-flagged frame of lower-case CRLF header lines."""
    block = trailer_frame([("grpc-status", "0"), ("X-Trace", "a")])
    body = b"grpc-status: 0\r\nx-trace: a\r\n"
    assert block == b"\x80" + len(body).to_bytes(4, "big") + body


def test_text_decoder_whole_and_split() -> None:
    """A base64 body decodes however it is split."""
    raw = frame(b"hello") + frame(b"world!")
    text = base64.b64encode(raw)
    for cut in range(len(text) + 1):
        decoder = TextDecoder()
        assert decoder.feed(text[:cut]) + decoder.feed(text[cut:]) == raw
        decoder.finish()


def test_text_decoder_concatenated_padded_segments() -> None:
    """Several independently padded base64 segments decode to their concatenation."""
    parts = [b"a", b"bc", b"def", b"g"]
    text = b"".join(base64.b64encode(p) for p in parts)
    assert TextDecoder().feed(text) == b"abcdefg"


def test_text_decoder_segments_match_group_by_group_decoding() -> None:
    """Bodies of many independently padded segments, fed in random pieces, decode as the
    reference (each 4-character group on its own) does; misplaced padding is refused."""
    import base64
    import random

    rng = random.Random(7)
    for _ in range(200):
        parts = [rng.randbytes(rng.randrange(0, 12)) for _ in range(rng.randrange(1, 30))]
        text = b"".join(base64.b64encode(part) for part in parts)
        decoder = TextDecoder()
        out = b""
        position = 0
        while position < len(text):
            step = rng.randrange(1, 20)
            out += decoder.feed(text[position : position + step])
            position += step
        decoder.finish()
        assert out == b"".join(parts)
    for bad in (b"A=AA", b"AA=A", b"A===", b"AA==A=AA", b"QUJD=AAA"):
        with pytest.raises(GrpcError):
            TextDecoder().feed(bad)


def test_text_decoder_rejects_garbage_and_truncation() -> None:
    """Non-base64 input and a dangling partial group are INVALID_ARGUMENT."""
    with pytest.raises(GrpcError) as info:
        TextDecoder().feed(b"!!!!")
    assert info.value.status == Status.INVALID_ARGUMENT
    decoder = TextDecoder()
    decoder.feed(b"YWJj" + b"YW")
    with pytest.raises(GrpcError):
        decoder.finish()


def test_encode_text_is_padded_base64() -> None:
    """Each reply chunk is valid padded base64 on its own."""
    assert encode_text(b"ab") == b"YWI="
    assert base64.b64decode(encode_text(b"\x80\x00")) == b"\x80\x00"


def test_cors_any_origin() -> None:
    """The default policy allows any origin and exposes the gRPC status headers."""
    policy = CorsPolicy()
    assert policy.allows("https://anything.example")
    headers = dict(policy.response_headers("https://anything.example"))
    assert headers["access-control-allow-origin"] == "*"
    assert "grpc-status" in headers["access-control-expose-headers"]
    assert "grpc-message" in headers["access-control-expose-headers"]
    assert policy.response_headers(None) == []


def test_cors_listed_origins() -> None:
    """A list of origins is matched exactly (case-insensitively) and reflected."""
    policy = CorsPolicy(["https://app.example.com"])
    assert policy.allows("https://APP.example.com")
    assert not policy.allows("https://evil.example.com")
    assert policy.allows(None)
    headers = dict(policy.response_headers("https://app.example.com"))
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert headers["vary"] == "Origin"
    assert policy.response_headers("https://evil.example.com") == []


def test_cors_preflight() -> None:
    """Preflights are granted for allowed origins, echo the requested headers, and 403 otherwise."""
    policy = CorsPolicy(["https://app.example.com"])
    status, headers = policy.preflight("https://app.example.com", "x-grpc-web, content-type", True)
    granted = dict(headers)
    assert status == 204
    assert granted["access-control-allow-headers"] == "x-grpc-web, content-type"
    assert "POST" in granted["access-control-allow-methods"]
    assert granted["access-control-allow-private-network"] == "true"
    assert policy.preflight("https://evil.example.com", None, False) == (403, [])
    assert policy.preflight(None, None, False) == (204, [])


def test_cors_exposes_the_names_of_the_response_headers() -> None:
    """Browsers hide every response header not listed as exposed, so the names of the
    metadata a response carries are added to the fixed list (once each)."""
    policy = CorsPolicy()
    headers = dict(policy.response_headers("https://a.example", ["x-request-id", "grpc-status", "x-request-id"]))
    exposed = [name.strip() for name in headers["access-control-expose-headers"].split(",")]
    assert exposed.count("x-request-id") == 1
    assert exposed.count("grpc-status") == 1
    assert policy.response_headers(None, ["x-request-id"]) == []


def test_text_decoder_refuses_a_body_of_padding() -> None:
    """``AA==AA==...`` up to the size limit cost half a second of the event loop (a decode
    call per segment) without any payment: beyond 64 padded segments plus one per KiB the
    body is refused, however it is split; what real clients send never comes near."""
    decoder = TextDecoder()
    for _ in range(6):
        decoder.feed(b"AA==" * 10)
    with pytest.raises(GrpcError) as info:
        decoder.feed(b"AA==" * 10)
    assert info.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(GrpcError):
        TextDecoder().feed(b"AAA=" * 1_000_000)
    assert TextDecoder().feed(b"AA==" * 64) == b"\x00" * 64
    # One base64 string per message, as grpc-web sends, for a stream of messages.
    decoder = TextDecoder()
    message = frame(b"x" * 1000)
    assert b"".join(decoder.feed(base64.b64encode(message)) for _ in range(5000)) == message * 5000
