"""HPACK (RFC 7541) for the daemon's HTTP/2 connections, cheaper than the hpack package.

h2 compresses and decompresses every header block with the pure-Python
``hpack`` package.  On a proxied call that cost the daemon about 60 of its
280 us unpaid and 110 of its 555 us paid (py-spy in ``benchmarks/paid.py``):
a paid call brings five headers whose values are new on every call (amount,
signature...), which hpack decodes Huffman nibble by nibble, copies the rest
of the block for, adds to its table, and on the way out searches its dynamic
table for linearly, entry by entry, before adding them there too, evicting
the previous call's.  The two classes here do the same job for h2 (it takes
any object with the same methods and attributes: ``conn.encoder``,
``conn.decoder``) at a fraction of the cost (a paid request's block decodes
in 11-16 us instead of 33-37 and encodes in 3.5 us instead of 19-20; the
daemon's CPU per call fell 13% unpaid and 10% paid), and raise hpack's own
exceptions, so h2 still answers a bad block with COMPRESSION_ERROR and an
oversized one with ENHANCE_YOUR_CALM.

`Decoder` decodes the whole format: indexed fields, literals with and
without indexing and never indexed, table size updates (checked against
what we allowed in our SETTINGS), Huffman strings a byte at a time through
a table derived from hpack's own state machine (so the same strings are
accepted and refused), and the header list size limit.

`Encoder` adds a header field to the peer's dynamic table only the second
time it sends it, so values that never repeat (the payment headers a
daemon forwards) are sent as plain literals without touching the table,
while the fields every call repeats (``:path``, ``content-type``, ``te``,
``grpc-status: 0``...) cost one or two bytes from their third use on.  It
finds a field with one dictionary lookup, never Huffman-codes (the links a
daemon uses are not short of bytes; hpack's Huffman coder is the slowest
part of it), and answers a change of the peer's table size with a table
size update at the start of the next block, as RFC 7541 section 4.2 asks.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Iterable
from typing import Final

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import HUFFMAN_COMPLETE, HUFFMAN_EMIT_SYMBOL, HUFFMAN_FAIL, HUFFMAN_TABLE
from hpack.struct import HeaderTuple, NeverIndexedHeaderTuple
from hpack.table import HeaderTable

from snet_daemon.varint import encode_varint

Header = tuple[bytes, bytes]
#: What the encoder accepts: str is encoded as UTF-8, as hpack does.
AnyHeader = tuple[bytes | str, bytes | str]

#: RFC 7541 section 4.1: an entry's size is its name and value plus 32.
_ENTRY_OVERHEAD: Final = 32
#: The table size both ends start with (SETTINGS_HEADER_TABLE_SIZE default).
_DEFAULT_TABLE_SIZE: Final = 4096
#: hpack's default limit on a decoded header list (h2 lowers it further).
_DEFAULT_MAX_HEADER_LIST_SIZE: Final = 2**16
#: Continuation octets of an integer beyond which it is refused (RFC 7541
#: section 5.1 leaves the limit to the implementation): four carry 28 bits,
#: more than any length or index in a header block can need.
_VARINT_MAX_OCTETS: Final = 4

_STATIC: Final[tuple[Header, ...]] = tuple(HeaderTable.STATIC_TABLE)
_STATIC_COUNT: Final = len(_STATIC)  # 61
#: The one-octet indexed form of each field in the static table, and the
#: first index of each name there.
_STATIC_BLOCKS: Final[dict[AnyHeader, bytes]] = {}
_STATIC_NAMES: Final[dict[bytes, int]] = {}
for _index, _field in enumerate(_STATIC, start=1):
    _STATIC_BLOCKS.setdefault(_field, bytes((0x80 | _index,)))
    _STATIC_NAMES.setdefault(_field[0], _index)


# -- Huffman -----------------------------------------------------------------------

_FAIL_BIT: Final = 0x200
_COMPLETE_BIT: Final = 0x100


def _byte_table() -> array[int]:
    """hpack's nibble state machine composed into one step per input byte.

    Entry ``state << 8 | byte`` packs into 28 bits: the next state (bits
    0-7), whether the string may end there (bit 8: only padding of at most
    7 bits, a prefix of EOS, is left), an invalid code (bit 9), how many
    symbols the byte completes (bits 10-11: none, one or two) and those
    symbols (bits 12-19 and 20-27).  An array of 65,536 32-bit integers
    (256 KiB) stays in the CPU caches between calls; a list of tuples was
    faster alone but took 1.5 times as long as hpack's decoder in the daemon,
    where this one is 1.4 times as fast (0.22 against 0.30 us an octet at 16
    calls in flight, 0.31 against 0.50 at one).  Built at import, in about
    35 ms, so that no call waits for it.
    """
    table = array("I", bytes(4 * 65536))
    for state in range(256):
        for byte in range(256):
            high, flags, symbol = HUFFMAN_TABLE[state * 16 + (byte >> 4)]
            if flags & HUFFMAN_FAIL:
                table[state << 8 | byte] = _FAIL_BIT
                continue
            symbols = [symbol] if flags & HUFFMAN_EMIT_SYMBOL else []
            low, flags, symbol = HUFFMAN_TABLE[high * 16 + (byte & 0x0F)]
            if flags & HUFFMAN_FAIL:
                table[state << 8 | byte] = _FAIL_BIT
                continue
            if flags & HUFFMAN_EMIT_SYMBOL:
                symbols.append(symbol)
            entry = low | (_COMPLETE_BIT if flags & HUFFMAN_COMPLETE else 0) | len(symbols) << 10
            for position, emitted in enumerate(symbols):
                entry |= emitted << (12 + 8 * position)
            table[state << 8 | byte] = entry
    return table


_BYTE_TABLE: Final = _byte_table()


def decode_huffman(data: bytes) -> bytes:
    """Decode a Huffman-coded HPACK string (RFC 7541 section 5.2).

    Raises:
        HPACKDecodingError: for an invalid code (EOS included), or padding
            that is not a prefix of EOS or longer than 7 bits.
    """
    if not data:
        return b""
    table = _BYTE_TABLE
    out = bytearray()
    append = out.append
    state = 0
    entry = _COMPLETE_BIT
    for byte in data:
        entry = table[state << 8 | byte]
        if entry & 0xE00:
            if entry & _FAIL_BIT:
                raise HPACKDecodingError("Invalid Huffman string")
            append(entry >> 12 & 0xFF)
            if entry & 0x800:
                append(entry >> 20)
        state = entry & 0xFF
    if not entry & _COMPLETE_BIT:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


# -- decoding -------------------------------------------------------------------------


def _integer(data: bytes, pos: int, number: int) -> tuple[int, int]:
    """The rest of an integer whose prefix was all ones (``number``), from ``pos``."""
    shift = 0
    end = len(data)
    for _ in range(_VARINT_MAX_OCTETS):
        if pos >= end:
            raise HPACKDecodingError("Truncated header block")
        byte = data[pos]
        pos += 1
        number += (byte & 0x7F) << shift
        if byte < 0x80:
            return number, pos
        shift += 7
    raise HPACKDecodingError("Integer representation is too long")


def _string(data: bytes, pos: int, budget: int) -> tuple[bytes, int]:
    """The string literal at ``pos`` and the position after it.

    Raises `OversizedHeaderListError` *before* decoding a string that
    cannot fit in ``budget`` (what is left of the header list limit): a
    Huffman string decodes to at least 8/30 of its length, and decoding a
    huge one would stall the event loop for seconds.
    """
    if pos >= len(data):
        raise HPACKDecodingError("Truncated header block")
    first = data[pos]
    length = first & 0x7F
    pos += 1
    if length == 0x7F:
        length, pos = _integer(data, pos, 0x7F)
    end = pos + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block")
    if (length * 8 // 30 if first & 0x80 else length) > budget:
        raise OversizedHeaderListError("A header list larger than the limit has been received")
    if first & 0x80:
        return decode_huffman(data[pos:end]), end
    return data[pos:end], end


class Decoder:
    """Decodes the header blocks of one connection; a drop-in for ``hpack.Decoder``.

    The attributes h2 sets are those of ``hpack.Decoder``:
    ``max_header_list_size`` (a decoded list above it raises
    `OversizedHeaderListError`), ``max_allowed_table_size`` (the table size
    our acknowledged SETTINGS allow the peer) and ``header_table_size`` (the
    size the peer's table size updates set).
    """

    def __init__(self, max_header_list_size: int = _DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.max_header_list_size = max_header_list_size
        self.max_allowed_table_size = _DEFAULT_TABLE_SIZE
        self._maxsize = _DEFAULT_TABLE_SIZE
        #: Newest first, as dynamic indices count (62 is the newest).
        self._entries: deque[Header] = deque()
        self._size = 0

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._maxsize = value
        self._shrink()

    def decode(self, data: bytes | bytearray | memoryview, raw: bool = False) -> list[Header] | list[tuple[str, str]]:
        """Decode one complete header block into ``(name, value)`` pairs.

        A never-indexed field comes back as an ``hpack`` `NeverIndexedHeaderTuple`
        (so a proxy can keep the peer's wish when it passes the field on),
        every other as a plain tuple.  With ``raw`` false names and values
        are decoded as UTF-8.

        Raises:
            HPACKDecodingError: for a malformed block (h2 answers with
                COMPRESSION_ERROR); its subclasses `InvalidTableIndex`,
                `InvalidTableSizeError` and `OversizedHeaderListError`.
        """
        if not isinstance(data, bytes):
            data = bytes(data)
        headers: list[Header] = []
        append = headers.append
        end = len(data)
        pos = 0
        inflated = 0
        limit = self.max_header_list_size
        get = self._get
        while pos < end:
            first = data[pos]
            pos += 1
            header: Header
            if first & 0x80:
                # Indexed field.
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _integer(data, pos, index)
                header = get(index)
            elif first & 0xE0 == 0x20:
                # Dynamic table size update: only before the first field.
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size = first & 0x1F
                if size == 0x1F:
                    size, pos = _integer(data, pos, size)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.header_table_size = size
                continue
            else:
                # A literal: with incremental indexing (01, a 6-bit name
                # index), without indexing (0000) or never indexed (0001).
                mask = 0x3F if first & 0x40 else 0x0F
                index = first & mask
                if index == mask:
                    index, pos = _integer(data, pos, index)
                budget = limit - inflated - _ENTRY_OVERHEAD
                if index:
                    name = get(index)[0]
                else:
                    name, pos = _string(data, pos, budget)
                value, pos = _string(data, pos, budget - len(name))
                if first & 0x40:
                    header = (name, value)
                    self._add(header)
                elif first & 0x10:
                    header = NeverIndexedHeaderTuple(name, value)
                else:
                    header = (name, value)
            append(header)
            inflated += len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
            if inflated > limit:
                raise OversizedHeaderListError(f"A header list larger than {limit} has been received")
        # A peer told to shrink its table must have done so by now.
        if self._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if raw:
            return headers
        try:
            return [_text(header) for header in headers]
        except UnicodeDecodeError as exc:
            raise HPACKDecodingError("Unable to decode headers as UTF-8") from exc

    def _get(self, index: int) -> Header:
        if 0 < index <= _STATIC_COUNT:
            return _STATIC[index - 1]
        position = index - _STATIC_COUNT - 1
        if 0 <= position < len(self._entries):
            return self._entries[position]
        raise InvalidTableIndex(f"Invalid table index {index}")

    def _add(self, header: Header) -> None:
        size = len(header[0]) + len(header[1]) + _ENTRY_OVERHEAD
        if size > self._maxsize:
            # RFC 7541 section 4.4: the table is emptied, the entry not added.
            self._entries.clear()
            self._size = 0
            return
        self._entries.appendleft(header)
        self._size += size
        self._shrink()

    def _shrink(self) -> None:
        entries = self._entries
        while self._size > self._maxsize:
            name, value = entries.pop()
            self._size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _text(header: Header) -> tuple[str, str]:
    name, value = header[0].decode("utf-8"), header[1].decode("utf-8")
    if isinstance(header, NeverIndexedHeaderTuple):
        return NeverIndexedHeaderTuple(name, value)  # type: ignore[return-value]
    return (name, value)


# -- encoding -------------------------------------------------------------------------


def _encode_integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """``value`` with an N-bit prefix (RFC 7541 section 5.1), ``flags`` in the first octet."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes((flags | value,))
    # The rest follows as an unsigned LEB128 varint.
    return bytes((flags | top,)) + encode_varint(value - top)


def _literal(name: bytes, value: bytes, prefix_bits: int, flags: int) -> bytes:
    """A literal field: indexed static name if there is one, raw (not Huffman) strings."""
    index = _STATIC_NAMES.get(name, 0)
    head = _encode_integer(index, prefix_bits, flags)
    if not index:
        head += _encode_integer(len(name), 7, 0) + name
    return head + _encode_integer(len(value), 7, 0) + value


class Encoder:
    """Encodes the header blocks of one connection; a drop-in for ``hpack.Encoder``.

    A field goes into the peer's dynamic table the second time it is sent
    (if it is small enough to stay there a while), and is then sent by its
    index while it is there.  The table is modelled exactly: entries are
    numbered in insertion order, so an entry's index is its distance from
    the newest, and eviction drops the oldest, as the peer's decoder does.
    """

    #: Fields seen once (of at most a quarter of the table), remembered to be
    #: indexed when seen again; forgotten all at once when full, so values
    #: that never repeat cost little memory.
    _SEEN_LIMIT: Final = 512

    def __init__(self) -> None:
        self._maxsize = _DEFAULT_TABLE_SIZE
        #: Insertion number of each field in the table.
        self._indexed: dict[AnyHeader, int] = {}
        #: (field, size) oldest first; insertion numbers run from ``_oldest``.
        self._entries: deque[tuple[Header, int]] = deque()
        self._oldest = 0
        self._inserted = 0
        self._size = 0
        self._seen: set[Header] = set()
        #: Table size changes not yet announced: the smallest and the last.
        self._size_update: tuple[int, int] | None = None

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: announced in the next block.

        We never use more than the default 4096 octets.  If the limit fell
        and rose again before the next block, the smallest size is announced
        first, then the last (RFC 7541 section 4.2).
        """
        value = min(value, _DEFAULT_TABLE_SIZE)
        pending = self._size_update
        self._size_update = (value, value) if pending is None else (min(pending[0], value), value)

    def encode(self, headers: Iterable[AnyHeader], huffman: bool = False) -> bytes:
        """Encode ``headers`` (bytes or str pairs) as one header block.

        ``huffman`` is accepted for hpack's signature and ignored: strings
        are always sent as they are.
        """
        parts: list[bytes] = []
        if self._size_update is not None:
            for size in dict.fromkeys(self._size_update):
                self._maxsize = size
                self._shrink()
                parts.append(_encode_integer(size, 5, 0x20))
            self._size_update = None
        indexed = self._indexed
        for header in headers:
            if type(header) is not tuple and type(header) is not HeaderTuple:
                parts.append(self._odd(header))
                continue
            number = indexed.get(header)
            if number is not None:
                parts.append(_encode_integer(self._inserted - number + _STATIC_COUNT, 7, 0x80))
                continue
            block = _STATIC_BLOCKS.get(header)
            parts.append(self._first(header) if block is None else block)
        return b"".join(parts)

    def _first(self, header: AnyHeader) -> bytes:
        """A field in neither table: a new entry if seen before, else a literal."""
        name, value = header
        if isinstance(name, str) or isinstance(value, str):
            return self._odd(header)
        header = (name, value)
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self._maxsize // 4:
            # Too big to stay in the table a while: never indexed, nor remembered.
            return _literal(name, value, 4, 0x00)
        if header in self._seen:
            self._add(header, size)
            return _literal(name, value, 6, 0x40)
        if len(self._seen) >= self._SEEN_LIMIT:
            self._seen.clear()
        self._seen.add(header)
        return _literal(name, value, 4, 0x00)

    def _odd(self, header: AnyHeader) -> bytes:
        """Never-indexed fields and str pairs: literals, the table left alone."""
        name, value = header
        name_bytes = name.encode("utf-8") if isinstance(name, str) else bytes(name)
        value_bytes = value.encode("utf-8") if isinstance(value, str) else bytes(value)
        if isinstance(header, NeverIndexedHeaderTuple):
            return _literal(name_bytes, value_bytes, 4, 0x10)
        return self.encode([(name_bytes, value_bytes)])

    def _add(self, header: Header, size: int) -> None:
        self._seen.discard(header)
        self._entries.append((header, size))
        self._indexed[header] = self._inserted
        self._inserted += 1
        self._size += size
        self._shrink()

    def _shrink(self) -> None:
        while self._size > self._maxsize:
            header, size = self._entries.popleft()
            if self._indexed.get(header) == self._oldest:
                del self._indexed[header]
            self._oldest += 1
            self._size -= size
