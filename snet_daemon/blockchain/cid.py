"""IPFS content identifiers: parse them, and check content against them.

Metadata reaches the daemon through IPFS gateways and APIs it does not
control; the CID in the Registry is the only thing on chain.  The Go daemon's
"verification" rebuilds the CID from the CID's own bytes and so checks
nothing.  Here content is accepted only if it hashes to the CID:

* a **raw** block (CIDv1, codec ``raw``) is the content; its sha2-256 must be
  the CID's digest;
* a **dag-pb** block (CIDv0 ``Qm...``, or CIDv1 codec ``dag-pb``) is a
  UnixFS node; a file is its own data followed by the content of its linked
  children, in order, each child checked against the CID in the link.  This
  covers every file layout (kubo's balanced DAG, trickle DAGs, raw or dag-pb
  leaves, any chunk size): :func:`fetch_verified` walks the DAG block by
  block, fetching each distinct block once and visiting a bounded number
  of nodes (:func:`max_blocks`), so a small DAG of links to empty blocks
  cannot make it fetch without end.

Where only whole content is available (an HTTP gateway), :func:`verify_content`
rebuilds the DAG the way ``ipfs add`` does by default (256 KiB chunks, a
balanced DAG of at most 174 links per node; dag-pb leaves for CIDv0, raw leaves
for CIDv1) and compares roots; content added with other settings cannot be
checked that way and is refused.  :func:`build_dag` is the same builder, used by
the test IPFS server so that its CIDs are those kubo would give.

Only sha2-256 multihashes are accepted: it is what every IPFS implementation
uses by default, and accepting e.g. the ``identity`` hash would accept
anything.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from snet_daemon.varint import encode_varint

__all__ = [
    "DAG_PB",
    "MAX_CID_TEXT",
    "RAW",
    "Cid",
    "CidError",
    "CidMismatch",
    "DagBuild",
    "UnixFsNode",
    "build_dag",
    "fetch_verified",
    "max_blocks",
    "parse_dag_pb",
    "verify_block",
    "verify_content",
]

#: Multicodec codes of the two IPLD codecs a UnixFS file uses.
DAG_PB = 0x70
RAW = 0x55
_SHA2_256 = 0x12
_CODEC_NAMES = {DAG_PB: "dag-pb", RAW: "raw"}

#: kubo's defaults for ``ipfs add``.
DEFAULT_CHUNK_SIZE = 256 * 1024
DEFAULT_MAX_LINKS = 174

# UnixFS Data.DataType values.
_UNIXFS_RAW = 0
_UNIXFS_FILE = 2
_UNIXFS_TYPE_NAMES = {0: "raw", 1: "directory", 2: "file", 3: "metadata", 4: "symlink", 5: "HAMT shard"}

#: Longest CID text parsed.  A sha2-256 CID is at most 73 characters (CIDv1
#: in base16); base58 decoding takes time quadratic in the length, and the
#: text comes from the Registry (any ``metadataURI`` without a scheme), so a
#: long one could hold the reactor thread for minutes.
MAX_CID_TEXT = 128

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {char: index for index, char in enumerate(_B58_ALPHABET)}


class CidError(ValueError):
    """A CID, a block or a UnixFS node is malformed or unsupported."""


class CidMismatch(CidError):
    """Content does not hash to the CID it was fetched by."""


# --------------------------------------------------------------------------
# Encodings: base58btc, multibase, varints.


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    out = []
    while number:
        number, rest = divmod(number, 58)
        out.append(_B58_ALPHABET[rest])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(out))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        try:
            number = number * 58 + _B58_INDEX[char]
        except KeyError:
            raise CidError(f"invalid base58 character {char!r}") from None
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def _b32decode(text: str) -> bytes:
    return base64.b32decode(text.upper() + "=" * (-len(text) % 8))


def _b64decode(text: str, altchars: bytes | None) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=altchars, validate=True)


# Multibase prefix -> decoder, for the bases CIDs are written in in practice.
_MULTIBASE: dict[str, Callable[[str], bytes]] = {
    "b": _b32decode,
    "B": _b32decode,
    "z": _b58decode,
    "f": bytes.fromhex,
    "F": bytes.fromhex,
    "m": lambda text: _b64decode(text, None),
    "u": lambda text: _b64decode(text, b"-_"),
}


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """Decode an unsigned LEB128 varint at ``offset``; return (value, next offset)."""
    value = shift = 0
    while True:
        if offset >= len(data):
            raise CidError("truncated varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7
        if shift > 63:
            raise CidError("varint too long")


# --------------------------------------------------------------------------
# CIDs.


@dataclass(frozen=True, slots=True)
class Cid:
    """A sha2-256 CID.

    Attributes:
        version: 0 (``Qm...``, always dag-pb) or 1.
        codec: :data:`DAG_PB` or :data:`RAW`.
        digest: The 32-byte sha2-256 digest.
    """

    version: int
    codec: int
    digest: bytes

    @classmethod
    def parse(cls, text: str) -> Cid:
        """Parse a CID in its string form (CIDv0 base58, or CIDv1 in a multibase).

        Raises:
            CidError: the text is not a CID, or uses a hash or codec other than
                sha2-256 with dag-pb or raw.
        """
        text = text.strip()
        if len(text) > MAX_CID_TEXT:
            raise CidError(f"{text[:20]!r}... is not a CID ({len(text)} characters, at most {MAX_CID_TEXT})")
        if len(text) == 46 and text.startswith("Qm"):
            return cls.from_bytes(_b58decode(text))
        if not text:
            raise CidError("empty CID")
        decoder = _MULTIBASE.get(text[0])
        if decoder is None:
            raise CidError(f"{text!r} is not a CID (unknown multibase prefix {text[0]!r})")
        try:
            raw = decoder(text[1:])
        except (ValueError, TypeError) as exc:
            raise CidError(f"{text!r} is not a CID ({exc})") from None
        return cls.from_bytes(raw)

    @classmethod
    def from_bytes(cls, raw: bytes) -> Cid:
        """Parse a binary CID (as found in dag-pb links)."""
        if raw[:2] == bytes((_SHA2_256, 32)):
            if len(raw) != 34:
                raise CidError("CIDv0 is not 34 bytes long")
            return cls(0, DAG_PB, raw[2:])
        version, offset = _read_varint(raw, 0)
        if version != 1:
            raise CidError(f"unsupported CID version {version}")
        codec, offset = _read_varint(raw, offset)
        if codec not in _CODEC_NAMES:
            raise CidError(f"unsupported CID codec 0x{codec:x} (only dag-pb and raw files are content)")
        hash_code, offset = _read_varint(raw, offset)
        length, offset = _read_varint(raw, offset)
        if hash_code != _SHA2_256:
            raise CidError(f"unsupported multihash 0x{hash_code:x} (only sha2-256)")
        digest = raw[offset:]
        if length != 32 or len(digest) != 32:
            raise CidError("sha2-256 digest is not 32 bytes long")
        return cls(1, codec, digest)

    @classmethod
    def of_block(cls, block: bytes, *, codec: int, version: int) -> Cid:
        """The CID of a block (CIDv0 only for dag-pb)."""
        if version == 0 and codec != DAG_PB:
            raise CidError("CIDv0 can only name dag-pb blocks")
        return cls(version, codec, hashlib.sha256(block).digest())

    @property
    def multihash(self) -> bytes:
        """The binary multihash (sha2-256, 32 bytes)."""
        return bytes((_SHA2_256, 32)) + self.digest

    def to_bytes(self) -> bytes:
        """The binary CID."""
        if self.version == 0:
            return self.multihash
        return encode_varint(1) + encode_varint(self.codec) + self.multihash

    def __str__(self) -> str:
        if self.version == 0:
            return _b58encode(self.multihash)
        return "b" + base64.b32encode(self.to_bytes()).decode().lower().rstrip("=")

    def __repr__(self) -> str:
        return f"Cid({str(self)!r})"


def verify_block(cid: Cid, block: bytes) -> None:
    """Check that ``block`` is the block named by ``cid``.

    Raises:
        CidMismatch: its sha2-256 differs from the CID's digest.
    """
    if hashlib.sha256(block).digest() != cid.digest:
        raise CidMismatch(f"content does not match CID {cid} (sha2-256 {hashlib.sha256(block).hexdigest()})")


# --------------------------------------------------------------------------
# dag-pb and UnixFS (protobuf, decoded by hand: two tiny messages).


@dataclass(frozen=True, slots=True)
class PbLink:
    """One dag-pb link."""

    cid: Cid
    name: str
    tsize: int | None


@dataclass(frozen=True, slots=True)
class UnixFsNode:
    """The UnixFS ``Data`` message of a dag-pb node."""

    type: int
    data: bytes
    filesize: int | None
    blocksizes: tuple[int, ...]


def _fields(message: bytes) -> list[tuple[int, int, int | bytes]]:
    """Split a protobuf message into (field number, wire type, value)."""
    out: list[tuple[int, int, int | bytes]] = []
    offset = 0
    while offset < len(message):
        key, offset = _read_varint(message, offset)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, offset = _read_varint(message, offset)
            out.append((number, wire, value))
        elif wire == 2:
            length, offset = _read_varint(message, offset)
            if offset + length > len(message):
                raise CidError("truncated protobuf field")
            out.append((number, wire, message[offset : offset + length]))
            offset += length
        else:
            raise CidError(f"unexpected protobuf wire type {wire}")
    return out


def parse_dag_pb(block: bytes) -> tuple[list[PbLink], bytes | None]:
    """Decode a dag-pb block into its links and its data.

    Raises:
        CidError: the block is not valid dag-pb.
    """
    links: list[PbLink] = []
    data: bytes | None = None
    for number, wire, value in _fields(block):
        if number == 2 and wire == 2 and isinstance(value, bytes):
            link_hash: bytes | None = None
            name = ""
            tsize: int | None = None
            for lnumber, lwire, lvalue in _fields(value):
                if lnumber == 1 and lwire == 2 and isinstance(lvalue, bytes):
                    link_hash = lvalue
                elif lnumber == 2 and lwire == 2 and isinstance(lvalue, bytes):
                    name = lvalue.decode("utf-8", errors="replace")
                elif lnumber == 3 and lwire == 0 and isinstance(lvalue, int):
                    tsize = lvalue
            if link_hash is None:
                raise CidError("dag-pb link without a hash")
            links.append(PbLink(Cid.from_bytes(link_hash), name, tsize))
        elif number == 1 and wire == 2 and isinstance(value, bytes):
            data = value
        else:
            raise CidError(f"unexpected dag-pb field {number}")
    return links, data


def parse_unixfs(data: bytes) -> UnixFsNode:
    """Decode a UnixFS ``Data`` message.

    Raises:
        CidError: it is not valid UnixFS.
    """
    kind: int | None = None
    payload = b""
    filesize: int | None = None
    blocksizes: list[int] = []
    for number, _wire, value in _fields(data):
        if number == 1 and isinstance(value, int):
            kind = value
        elif number == 2 and isinstance(value, bytes):
            payload = value
        elif number == 3 and isinstance(value, int):
            filesize = value
        elif number == 4 and isinstance(value, int):
            blocksizes.append(value)
        elif number == 4 and isinstance(value, bytes):  # packed, as some encoders write it
            offset = 0
            while offset < len(value):
                size, offset = _read_varint(value, offset)
                blocksizes.append(size)
    if kind is None:
        raise CidError("UnixFS node without a type")
    return UnixFsNode(kind, payload, filesize, tuple(blocksizes))


def _encode_unixfs(kind: int, data: bytes | None, filesize: int, blocksizes: list[int]) -> bytes:
    """Encode UnixFS ``Data`` exactly as go-unixfs does (field order, unpacked sizes)."""
    out = bytearray(b"\x08" + encode_varint(kind))
    if data:
        out += b"\x12" + encode_varint(len(data)) + data
    out += b"\x18" + encode_varint(filesize)
    for size in blocksizes:
        out += b"\x20" + encode_varint(size)
    return bytes(out)


def _encode_dag_pb(links: list[PbLink], data: bytes) -> bytes:
    """Encode a dag-pb node canonically: links first, then data."""
    out = bytearray()
    for link in links:
        body = bytearray()
        raw = link.cid.to_bytes()
        body += b"\x0a" + encode_varint(len(raw)) + raw
        name = link.name.encode()
        body += b"\x12" + encode_varint(len(name)) + name
        if link.tsize is not None:
            body += b"\x18" + encode_varint(link.tsize)
        out += b"\x12" + encode_varint(len(body)) + body
    out += b"\x0a" + encode_varint(len(data)) + data
    return bytes(out)


# --------------------------------------------------------------------------
# Reading a file DAG, block by block.

GetBlock = Callable[[Cid], Awaitable[bytes]]


def max_blocks(max_size: int) -> int:
    """Most DAG nodes :func:`fetch_verified` walks for content of at most ``max_size`` bytes.

    A link to an empty block adds nothing to the size, so bounding bytes
    alone does not bound the walk: three levels of 300 links (a 12 KB root)
    are 27 million visits of a 0-byte file.  One node per KiB of content is
    far more than any real layout needs (kubo's default is one per 256 KiB;
    even 1 KiB chunks need ~1.01 per KiB), plus room for the inner nodes of
    a small file.
    """
    return max_size // 1024 + 64


async def fetch_verified(cid: Cid, get_block: GetBlock, *, max_size: int) -> bytes:
    """Fetch the file named by ``cid``, checking every block against its CID.

    The walk is bounded three ways, so that a small hostile DAG cannot keep
    the loader (and the metadata refresh lock) busy: at most
    :func:`max_blocks` nodes are visited, counting a block linked twice
    twice; each distinct block is fetched, verified and parsed once (a file
    may link one chunk many times); and the blocks fetched may total at most
    twice ``max_size`` (content plus links, which take a few percent).

    Args:
        cid: The root.
        get_block: Fetches one block by CID (e.g. Kubo's ``block/get``).
        max_size: Largest content accepted, in bytes; a DAG announcing or
            reaching more is refused before it is all fetched.

    Returns:
        The file's content.

    Raises:
        CidMismatch: a block does not hash to its CID.
        CidError: a block is malformed, not a file, or too large, or the DAG
            has too many nodes or blocks for ``max_size``.
        Exception: whatever ``get_block`` raises.
    """
    out = bytearray()
    node_limit = max_blocks(max_size)
    byte_limit = 2 * max_size + 64 * 1024
    # Each block once, as content (raw) or parsed (links, UnixFS data).
    parsed: dict[Cid, bytes | tuple[list[PbLink], UnixFsNode]] = {}
    visits = 0
    fetched = 0

    async def node(node_cid: Cid) -> bytes | tuple[list[PbLink], UnixFsNode]:
        nonlocal fetched
        known = parsed.get(node_cid)
        if known is not None:
            return known
        block = await get_block(node_cid)
        verify_block(node_cid, block)
        fetched += len(block)
        if fetched > byte_limit:
            raise CidError(f"DAG of {cid} has more than {byte_limit} bytes of blocks for {max_size} bytes of content")
        result: bytes | tuple[list[PbLink], UnixFsNode]
        if node_cid.codec == RAW:
            result = block
        else:
            links, data = parse_dag_pb(block)
            unixfs = parse_unixfs(data or b"")
            if unixfs.type not in (_UNIXFS_FILE, _UNIXFS_RAW):
                name = _UNIXFS_TYPE_NAMES.get(unixfs.type, str(unixfs.type))
                raise CidError(f"{node_cid} is a UnixFS {name}, not a file")
            result = (links, unixfs)
        parsed[node_cid] = result
        return result

    async def walk(node_cid: Cid, depth: int) -> None:
        nonlocal visits
        if depth > 64:
            raise CidError("UnixFS DAG is too deep")
        visits += 1
        if visits > node_limit:
            raise CidError(f"DAG of {cid} has more than {node_limit} nodes, too many for {max_size} bytes of content")
        found = await node(node_cid)
        if isinstance(found, bytes):
            out.extend(found)
        else:
            links, unixfs = found
            if unixfs.filesize is not None and unixfs.filesize > max_size - len(out):
                raise CidError(f"content of {node_cid} is larger than {max_size} bytes")
            out.extend(unixfs.data)
            for link in links:
                await walk(link.cid, depth + 1)
        if len(out) > max_size:
            raise CidError(f"content of {cid} is larger than {max_size} bytes")

    await walk(cid, 0)
    return bytes(out)


# --------------------------------------------------------------------------
# Building a file DAG the way ``ipfs add`` does.


@dataclass
class DagBuild:
    """A file's DAG: its root CID and every block by CID string."""

    root: Cid
    blocks: dict[str, bytes] = field(default_factory=dict)
    #: Cumulative size of the DAG (what ``ipfs add`` reports as ``Size``).
    size: int = 0


def build_dag(
    content: bytes,
    *,
    cid_version: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    max_links: int = DEFAULT_MAX_LINKS,
) -> DagBuild:
    """Chunk ``content`` and build kubo's balanced UnixFS DAG over it.

    CIDv0 gives dag-pb leaves (``ipfs add``); CIDv1 gives raw leaves
    (``ipfs add --cid-version=1``).  A port of go-unixfs
    ``importer/balanced``: the first leaf is the root until a second chunk
    arrives, then each full tree becomes the first child of a tree one
    level deeper.
    """
    raw_leaves = cid_version == 1
    blocks: dict[str, bytes] = {}
    chunks = [content[i : i + chunk_size] for i in range(0, len(content), chunk_size)] or [b""]
    position = 0

    def put(block: bytes, codec: int) -> Cid:
        cid = Cid.of_block(block, codec=codec, version=cid_version)
        blocks[str(cid)] = block
        return cid

    def leaf() -> tuple[Cid, int, int]:
        """Next chunk as a leaf: (cid, file size, cumulative DAG size)."""
        nonlocal position
        chunk = chunks[position]
        position += 1
        if raw_leaves:
            return put(chunk, RAW), len(chunk), len(chunk)
        block = _encode_dag_pb([], _encode_unixfs(_UNIXFS_FILE, chunk, len(chunk), []))
        return put(block, DAG_PB), len(chunk), len(block)

    def commit(children: list[tuple[Cid, int, int]]) -> tuple[Cid, int, int]:
        links = [PbLink(cid, "", tsize) for cid, _, tsize in children]
        sizes = [filesize for _, filesize, _ in children]
        block = _encode_dag_pb(links, _encode_unixfs(_UNIXFS_FILE, None, sum(sizes), sizes))
        return put(block, DAG_PB), sum(sizes), len(block) + sum(tsize for _, _, tsize in children)

    def fill(depth: int, first: tuple[Cid, int, int] | None = None) -> tuple[Cid, int, int]:
        children = [first] if first is not None else []
        while len(children) < max_links and position < len(chunks):
            children.append(leaf() if depth == 1 else fill(depth - 1))
        return commit(children)

    root = leaf()
    depth = 1
    while position < len(chunks):
        root = fill(depth, root)
        depth += 1
    return DagBuild(root=root[0], blocks=blocks, size=root[2])


def verify_content(cid: Cid, content: bytes) -> None:
    """Check whole content against ``cid`` by rebuilding kubo's default DAG.

    For a raw CID this is a plain hash check.  For dag-pb it holds for
    content added with ``ipfs add`` defaults, which is how metadata is
    published (snet-cli, Lighthouse); anything else is refused.

    Raises:
        CidMismatch: the rebuilt root differs from ``cid``.
    """
    if cid.codec == RAW:
        verify_block(cid, content)
        return
    built = build_dag(content, cid_version=cid.version)
    if built.root != cid:
        raise CidMismatch(f"content does not match CID {cid} (as added with IPFS defaults it would be {built.root})")
