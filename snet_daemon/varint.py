"""Unsigned LEB128 varints: protobuf's wire integers, also multiformats' (CIDs).

A leaf module so that the few places that write protobuf or CID bytes by
hand (the gRPC health probe, CIDv1 encoding) share one encoder.
"""

from __future__ import annotations

__all__ = ["encode_varint"]


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as an unsigned LEB128 varint."""
    if value < 0:
        raise ValueError("a varint cannot be negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
