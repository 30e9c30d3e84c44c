"""The daemon's h2/HPACK tuning: what it changes, and that it changes nothing on the wire."""

from __future__ import annotations

import h2.config
import h2.connection
import hpack
from hyperframe.frame import DataFrame

from snet_daemon.frontend._h2_tuning import plain_literals


def test_frame_repr_is_short_and_leaves_the_payload_out() -> None:
    frame = DataFrame(3, data=b"secret" * 1000)
    frame.flags.add("END_STREAM")
    assert repr(frame) == "DataFrame(stream_id=3, flags=['END_STREAM'])"


def test_plain_literals_decode_to_the_same_headers() -> None:
    """Headers sent without Huffman coding decode as before, and are not Huffman-coded."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    plain_literals(conn)
    headers = [(b"snet-payment-channel-signature-bin", b"q" * 88), (b"x-plain", b"value")]
    block = conn.encoder.encode(headers)
    assert b"q" * 88 in block  # sent as is
    assert hpack.Decoder().decode(block, raw=True) == headers
