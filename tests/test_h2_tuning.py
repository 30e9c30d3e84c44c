"""The daemon's h2/HPACK tuning: what it changes, and that it changes nothing on the wire."""

from __future__ import annotations

import random

import h2.config
import h2.connection
import h2.utilities
import hpack
import pytest
from h2.exceptions import ProtocolError
from hyperframe.frame import DataFrame

from snet_daemon.frontend import hpack_codec
from snet_daemon.frontend._h2_tuning import _h2_reject_illegal_characters, _reject_illegal_characters, fast_hpack

_REQUEST_FLAGS = h2.utilities.HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)


def test_frame_repr_is_short_and_leaves_the_payload_out() -> None:
    frame = DataFrame(3, data=b"secret" * 1000)
    frame.flags.add("END_STREAM")
    assert repr(frame) == "DataFrame(stream_id=3, flags=['END_STREAM'])"


def test_fast_hpack_installs_our_codec_and_keeps_h2s_limits() -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.decoder.max_header_list_size = 1234
    fast_hpack(conn)
    encoder: object = conn.encoder
    decoder: object = conn.decoder
    assert isinstance(encoder, hpack_codec.Encoder)
    assert isinstance(decoder, hpack_codec.Decoder)
    assert decoder.max_header_list_size == 1234
    headers = [(b"snet-payment-channel-signature-bin", b"q" * 88), (b"x-plain", b"value")]
    block = conn.encoder.encode(headers)
    assert b"q" * 88 in block  # sent as is, not Huffman-coded
    assert hpack.Decoder().decode(block, raw=True) == headers


def test_fast_hpack_connections_talk_to_stock_h2() -> None:
    """A request and its response between a tuned and a stock connection, both ways."""
    for tuned_side in ("client", "server"):
        client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        fast_hpack(client if tuned_side == "client" else server)
        client.initiate_connection()
        server.initiate_connection()
        request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"), (b":authority", b"x")]
        for round_ in range(3):
            stream = client.get_next_available_stream_id()
            client.send_headers(stream, [*request, (b"amount", str(round_).encode())], end_stream=True)
            events = server.receive_data(client.data_to_send())
            received = next(e for e in events if isinstance(e, h2.events.RequestReceived))
            assert list(received.headers) == [*request, (b"amount", str(round_).encode())]
            server.send_headers(stream, [(b":status", b"200"), (b"grpc-status", b"0")], end_stream=True)
            events = client.receive_data(server.data_to_send())
            response = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
            assert list(response.headers) == [(b":status", b"200"), (b"grpc-status", b"0")]


def test_character_check_accepts_and_refuses_exactly_as_h2() -> None:
    """Random names and values, rich in the octets the rules name: same verdict, same message."""
    assert _h2_reject_illegal_characters is not None  # the h2 this project installs has the check
    assert h2.utilities._reject_illegal_characters is _reject_illegal_characters
    rnd = random.Random(7)
    every_octet = bytes(range(256))
    refused = 0
    for _ in range(50_000):
        name = bytes(
            rnd.choice(every_octet) if rnd.random() < 0.05 else rnd.choice(b"abz-:AZ09 \t")
            for _ in range(rnd.randint(0, 8))
        )
        value = bytes(
            rnd.choice(every_octet) if rnd.random() < 0.05 else rnd.choice(b"az \t09\r\n\0")
            for _ in range(rnd.randint(0, 6))
        )
        verdicts: list[tuple[str, object]] = []
        for check in (_h2_reject_illegal_characters, _reject_illegal_characters):
            try:
                verdicts.append(("ok", list(check([(name, value)], _REQUEST_FLAGS))))
            except ProtocolError as exc:
                verdicts.append(("refused", str(exc)))
        assert verdicts[0] == verdicts[1], (name, value)
        refused += verdicts[0][0] == "refused"
    assert 1_000 < refused < 49_000  # both outcomes were exercised


@pytest.mark.parametrize(
    "header",
    [(b"Upper", b"v"), (b"na me", b"v"), (b"a:b", b"v"), (b"x", b"a\nb"), (b"x", b" lead"), (b"x", b"trail\t")],
)
def test_h2_still_refuses_bad_headers(header: tuple[bytes, bytes]) -> None:
    """Through h2's whole inbound validation, as the front end runs it."""
    request = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"x"), header]
    with pytest.raises(ProtocolError):
        list(h2.utilities.validate_headers(request, _REQUEST_FLAGS))
