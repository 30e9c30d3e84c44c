"""Our HPACK codec against RFC 7541's examples and against the hpack package, block by block."""

from __future__ import annotations

import base64
import random

import hpack
import pytest
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)

from snet_daemon.frontend.hpack_codec import Decoder, Encoder, decode_huffman

Headers = list[tuple[bytes, bytes]]

# -- RFC 7541 appendix C ------------------------------------------------------------

#: C.4: three requests on one connection, Huffman-coded.
_C4 = [
    (
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":authority", b"www.example.com")],
    ),
    (
        "828684be5886a8eb10649cbf",
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"www.example.com"),
            (b"cache-control", b"no-cache"),
        ],
    ),
    (
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":path", b"/index.html"),
            (b":authority", b"www.example.com"),
            (b"custom-key", b"custom-value"),
        ],
    ),
]

#: C.6: three responses with a 256-octet table, Huffman-coded: entries are evicted.
_C6 = [
    (
        "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c78f0b97c8e9ae82ae43d3",
        [
            (b":status", b"302"),
            (b"cache-control", b"private"),
            (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
            (b"location", b"https://www.example.com"),
        ],
    ),
    (
        "4883640effc1c0bf",
        [
            (b":status", b"307"),
            (b"cache-control", b"private"),
            (b"date", b"Mon, 21 Oct 2013 20:13:21 GMT"),
            (b"location", b"https://www.example.com"),
        ],
    ),
    (
        "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
        [
            (b":status", b"200"),
            (b"cache-control", b"private"),
            (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
            (b"location", b"https://www.example.com"),
            (b"content-encoding", b"gzip"),
            (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
        ],
    ),
]


@pytest.mark.parametrize("decoder_type", [hpack.Decoder, Decoder], ids=["hpack", "ours"])
def test_rfc7541_request_examples(decoder_type: type) -> None:
    decoder = decoder_type()
    for block, expected in _C4:
        assert list(decoder.decode(bytes.fromhex(block), raw=True)) == expected


@pytest.mark.parametrize("decoder_type", [hpack.Decoder, Decoder], ids=["hpack", "ours"])
def test_rfc7541_response_examples_evict_from_a_small_table(decoder_type: type) -> None:
    decoder = decoder_type()
    decoder.max_allowed_table_size = 256
    decoder.header_table_size = 256
    for block, expected in _C6:
        assert list(decoder.decode(bytes.fromhex(block), raw=True)) == expected
    if decoder_type is Decoder:
        # RFC 7541 C.6.3: three entries left, 215 octets.
        assert list(decoder._entries) == [
            (b"set-cookie", b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"),
            (b"content-encoding", b"gzip"),
            (b"date", b"Mon, 21 Oct 2013 20:13:22 GMT"),
        ]
        assert decoder._size == 215


def test_text_mode_decodes_utf8() -> None:
    block, expected = _C4[0]
    assert Decoder().decode(bytes.fromhex(block)) == [(name.decode(), value.decode()) for name, value in expected]


# -- against hpack, at random -------------------------------------------------------

_NAMES = [
    b":method",
    b":path",
    b"content-type",
    b"te",
    b"x-a",
    b"snet-payment-channel-signature-bin",
    b"grpc-status",
    b"x-" + b"n" * 200,
]


def _value(rnd: random.Random) -> bytes:
    kind = rnd.random()
    if kind < 0.3:
        return rnd.choice([b"POST", b"200", b"trailers", b"application/grpc", b"0", b""])
    if kind < 0.6:
        return base64.b64encode(rnd.randbytes(rnd.randint(0, 100)))
    if kind < 0.7:
        return rnd.randbytes(rnd.randint(0, 40))
    if kind < 0.75:
        return b"v" * rnd.randint(100, 5000)
    return str(rnd.randint(0, 10**30)).encode()


def _headers(rnd: random.Random) -> Headers:
    out: Headers = []
    for _ in range(rnd.randint(0, 15)):
        header = (rnd.choice(_NAMES), _value(rnd))
        out.append(NeverIndexedHeaderTuple(*header) if rnd.random() < 0.05 else header)
    return out


def test_decodes_what_hpack_encodes_as_hpack_decodes_it() -> None:
    """Streams of blocks, Huffman or not, with table size changes: same fields, same table."""
    rnd = random.Random(1)
    for _ in range(120):
        encoder, theirs, ours = hpack.Encoder(), hpack.Decoder(), Decoder()
        for _ in range(20):
            if rnd.random() < 0.1:
                size = rnd.choice([0, 100, 256, 4096])
                encoder.header_table_size = size
                theirs.max_allowed_table_size = ours.max_allowed_table_size = size
            block = encoder.encode(_headers(rnd), huffman=rnd.random() < 0.7)
            expected = theirs.decode(block, raw=True)
            got = ours.decode(block, raw=True)
            assert [tuple(h) for h in got] == [tuple(h) for h in expected]
            assert [isinstance(h, NeverIndexedHeaderTuple) for h in got] == [
                isinstance(h, NeverIndexedHeaderTuple) for h in expected
            ]
            assert list(ours._entries) == [tuple(e) for e in theirs.header_table.dynamic_entries]


def test_refuses_damaged_blocks_when_hpack_does() -> None:
    """Valid blocks with an octet changed, a bit flipped or cut short: same verdict as hpack."""
    rnd = random.Random(2)
    refused = 0
    for _ in range(5000):
        block = bytearray(hpack.Encoder().encode(_headers(rnd), huffman=rnd.random() < 0.7))
        if not block:
            continue
        damage = rnd.random()
        if damage < 0.4:
            block[rnd.randrange(len(block))] = rnd.randrange(256)
        elif damage < 0.7:
            del block[rnd.randrange(len(block)) :]
        else:
            block[rnd.randrange(len(block))] ^= 1 << rnd.randrange(8)
        verdicts: list[list[tuple[object, ...]] | None] = []
        for decoder in (hpack.Decoder(), Decoder()):
            try:
                verdicts.append([tuple(h) for h in decoder.decode(bytes(block), raw=True)])
            except (hpack.HPACKError, IndexError, UnicodeDecodeError):  # what h2 maps to a connection error
                verdicts.append(None)
        assert verdicts[0] == verdicts[1], bytes(block).hex()
        refused += verdicts[0] is None
    assert 500 < refused < 4500


# -- Huffman -------------------------------------------------------------------------


def test_huffman_round_trips_every_octet() -> None:
    everything = bytes(range(256)) * 2
    coded = hpack.huffman.HuffmanEncoder(
        hpack.huffman_constants.REQUEST_CODES, hpack.huffman_constants.REQUEST_CODES_LENGTH
    ).encode(everything)
    assert decode_huffman(coded) == everything
    assert decode_huffman(b"") == b""


@pytest.mark.parametrize(
    "coded",
    [
        bytes.fromhex("ffffffff"),  # EOS (30 ones) is not allowed in a string
        bytes.fromhex("1fff"),  # 'a' (00011) then 11 bits of ones: padding over 7 bits
        bytes.fromhex("18"),  # 'a' then padding of zeros, not a prefix of EOS
    ],
)
def test_huffman_refuses_what_hpack_refuses(coded: bytes) -> None:
    with pytest.raises(HPACKDecodingError):
        hpack.huffman_table.decode_huffman(coded)
    with pytest.raises(HPACKDecodingError):
        decode_huffman(coded)


# -- limits and errors ----------------------------------------------------------------


def test_header_list_over_the_limit_is_refused() -> None:
    block = hpack.Encoder().encode([(b"x", b"y" * 100)])
    assert Decoder(max_header_list_size=133).decode(block, raw=True) == [(b"x", b"y" * 100)]
    with pytest.raises(OversizedHeaderListError):
        Decoder(max_header_list_size=132).decode(block, raw=True)


@pytest.mark.parametrize("huffman", [True, False])
@pytest.mark.parametrize("where", ["name", "value"])
def test_a_string_that_cannot_fit_is_refused_before_it_is_decoded(
    monkeypatch: pytest.MonkeyPatch, huffman: bool, where: str
) -> None:
    """A huge literal is refused from its length alone: decoding megabytes of Huffman code
    first would stall the event loop for seconds."""
    from snet_daemon.frontend import hpack_codec

    decoded: list[int] = []
    real = hpack_codec.decode_huffman

    def counting(data: bytes) -> bytes:
        decoded.append(len(data))
        return real(data)

    monkeypatch.setattr(hpack_codec, "decode_huffman", counting)
    huge = hpack.Encoder().encode([(b"x", b"0" * 1_000_000)], huffman=huffman)
    if where == "name":
        huge = hpack.Encoder().encode([(b"0" * 1_000_000, b"x")], huffman=huffman)
    with pytest.raises(OversizedHeaderListError):
        Decoder(max_header_list_size=64 * 1024).decode(huge, raw=True)
    assert all(size < 1000 for size in decoded)
    # Up to the limit, the same block decodes (the early refusal is never wrong).
    small = hpack.Encoder().encode([(b"x", b"0" * 60_000)], huffman=huffman)
    assert Decoder(max_header_list_size=64 * 1024).decode(small, raw=True) == [(b"x", b"0" * 60_000)]


def test_table_size_updates_are_checked() -> None:
    decoder = Decoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):  # above what our SETTINGS allow
        decoder.decode(bytes.fromhex("3f4a"), raw=True)  # size update to 31 + 74 = 105
    with pytest.raises(InvalidTableSizeError):  # the peer did not shrink its table to 100
        Decoder.decode(decoder, bytes.fromhex("82"), raw=True)
    assert decoder.decode(bytes.fromhex("3f4582"), raw=True) == [(b":method", b"GET")]  # 31 + 69 = 100
    assert decoder.header_table_size == 100
    with pytest.raises(HPACKDecodingError, match="not at the start"):
        Decoder().decode(bytes.fromhex("8220"), raw=True)


@pytest.mark.parametrize(
    ("block", "error"),
    [
        ("80", InvalidTableIndex),  # index 0
        ("be", InvalidTableIndex),  # index 62: the dynamic table is empty
        ("ff80808080808001", HPACKDecodingError),  # an index in too many octets
        ("0003", HPACKDecodingError),  # a name said to be 3 octets long, with none
        ("40", HPACKDecodingError),  # a literal cut after its first octet
    ],
)
def test_malformed_blocks_raise_hpack_errors(block: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        Decoder().decode(bytes.fromhex(block), raw=True)


# -- encoding --------------------------------------------------------------------------


def test_encoder_output_decodes_with_hpack_across_table_size_changes() -> None:
    rnd = random.Random(3)
    for _ in range(150):
        encoder, decoder = Encoder(), hpack.Decoder()
        repeated = [_headers(rnd) for _ in range(5)]
        for _ in range(30):
            if rnd.random() < 0.1:
                size = rnd.choice([0, 100, 256, 4096, 8192])
                encoder.header_table_size = size
                if rnd.random() < 0.5:  # changed twice before the next block
                    size = rnd.choice([0, 100, 4096])
                    encoder.header_table_size = size
                decoder.max_allowed_table_size = size
            headers = rnd.choice(repeated) if rnd.random() < 0.7 else _headers(rnd)
            decoded = decoder.decode(encoder.encode(headers), raw=True)
            assert [tuple(h) for h in decoded] == [tuple(h) for h in headers]
            assert [isinstance(h, NeverIndexedHeaderTuple) for h in decoded] == [
                isinstance(h, NeverIndexedHeaderTuple) for h in headers
            ]


def test_encoder_indexes_a_field_the_second_time_and_never_a_unique_one() -> None:
    encoder = Encoder()
    field = (b"content-type", b"application/grpc")
    first = encoder.encode([field])
    second = encoder.encode([field])
    third = encoder.encode([field])
    assert first[0] & 0xF0 == 0x00  # literal without indexing
    assert second[0] & 0xC0 == 0x40  # literal with incremental indexing
    assert third == b"\xbe"  # index 62, the newest dynamic entry
    assert encoder.encode([(b":method", b"POST")]) == b"\x83"  # static table
    for amount in range(100):
        encoder.encode([(b"snet-payment-channel-amount", str(amount).encode())])
    assert encoder.encode([field]) == b"\xbe"  # still there: nothing unique was added
    assert len(encoder._entries) == 1


def test_encoder_never_indexes_nor_remembers_a_large_field() -> None:
    encoder = Encoder()
    big = (b"x-big-bin", b"b" * 2000)  # over a quarter of the 4096-octet table
    blocks = [encoder.encode([big]) for _ in range(3)]
    assert all(block[0] == 0x00 for block in blocks)  # literal without indexing, new name
    assert not encoder._seen
    assert not encoder._entries
    encoder.header_table_size = 0  # the peer allows no table at all: nothing is indexed
    field = (b"content-type", b"application/grpc")
    blocks = [encoder.encode([field]) for _ in range(3)]
    assert blocks[0][:1] == b"\x20"  # the size update to 0 comes first
    assert blocks[1][0] & 0xF0 == 0x00  # then literals without indexing, always
    assert blocks[2] == blocks[1]
    assert hpack.Decoder().decode(blocks[0], raw=True) == [field]


def test_encoder_announces_table_size_changes() -> None:
    encoder = Encoder()
    encoder.header_table_size = 0
    encoder.header_table_size = 8192  # we never use more than 4096
    assert encoder.encode([(b":method", b"GET")]).hex() == "203fe11f82"  # 0, then 4096, then the field
    assert encoder.encode([(b":method", b"GET")]) == b"\x82"


def test_encoder_takes_str_and_header_tuples() -> None:
    decoder = hpack.Decoder()
    encoder = Encoder()
    for _ in range(3):
        block = encoder.encode([("x-name", "välue"), HeaderTuple(b"x-b", b"1"), [b"x-c", b"2"]])  # type: ignore[list-item]
        assert decoder.decode(block, raw=True) == [(b"x-name", "välue".encode()), (b"x-b", b"1"), (b"x-c", b"2")]
