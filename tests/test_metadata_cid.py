"""CIDs: parsing, and content checked against them (single- and multi-block)."""

from __future__ import annotations

import hashlib
import time

import pytest

from snet_daemon.blockchain.cid import (
    DAG_PB,
    MAX_CID_TEXT,
    RAW,
    Cid,
    CidError,
    CidMismatch,
    PbLink,
    _encode_dag_pb,
    _encode_unixfs,
    build_dag,
    fetch_verified,
    max_blocks,
    parse_dag_pb,
    verify_content,
)
from snet_daemon.blockchain.loader import clean_uri
from tests.support.aio import aio_test


def pattern(size: int) -> bytes:
    """``(i * 7 + (i >> 8)) & 0xff`` for i < size: the content the reference vectors were made from."""
    period = b"".join(bytes((j * 7 + k) & 0xFF for j in range(256)) for k in range(256))
    return (period * (size // len(period) + 1))[:size]


# (content, CID version, CID, cumulative DAG size) as computed by the reference
# JS importer (npm ipfs-unixfs-importer 17.1.1, kubo's defaults: 256 KiB
# chunks, balanced DAG of 174 links; CIDv0 with dag-pb leaves, CIDv1 with raw
# leaves).  The empty and "hello world" CIDs are also what `ipfs add` prints.
VECTORS = [
    (b"", 0, "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH", 6),
    (b"", 1, "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku", 0),
    (b"hello world\n", 0, "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o", 20),
    (b"hello world\n", 1, "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4", 12),
    (pattern(262144), 0, "QmQrVyp1a4SsUrTQ7Mt6xxCArMcbMEHMt5oKPLfA4CuREz", 262158),
    (pattern(262144), 1, "bafkreibdffnmnzlbq264m4kqmxcslchnncczdb567t7xahpgbhdyigvtr4", 262144),
    (pattern(262145), 0, "QmYqRWLJRcKBePAeZWU2V9NQzKBFTzL9sEgnDg9W2wyyVY", 262267),
    (pattern(262145), 1, "bafybeielov4zxeb3kwwrtgpluv2mh72hsf7vjypbok654v7i2ox5ylnlje", 262249),
    (pattern(600000), 0, "QmYEWyer8uMgbuAHKyQoWrWtQoh3BqEQXbUYRbMUSWFZr8", 600194),
    (pattern(600000), 1, "bafybeidtfx2drdcs3chkd22slopllb5xdcrzumm23v7mkkl7mkmcsmkhr4", 600158),
]
# 175 chunks: one more than a node holds, so the DAG is two levels deep.
DEEP = (pattern(174 * 262144 + 1000), "QmVvNDzxb5u3nEhuxjV2Do1YGS7uJn5HswZHB5cYf74x6e", 45625023)


@pytest.mark.parametrize(("content", "version", "cid", "size"), VECTORS)
def test_build_dag_matches_reference_importer(content: bytes, version: int, cid: str, size: int) -> None:
    """The DAG builder gives the CID and size kubo's defaults give."""
    built = build_dag(content, cid_version=version)
    assert str(built.root) == cid
    assert built.size == size
    assert Cid.parse(cid) == built.root


def test_build_dag_two_levels_matches_reference_importer() -> None:
    """A file of more than 174 chunks gets the reference importer's two-level balanced DAG."""
    content, cid, size = DEEP
    built = build_dag(content)
    assert (str(built.root), built.size) == (cid, size)


def test_parse_cid_forms() -> None:
    """CIDv0 and CIDv1 in base32, base58btc and base16 name the same digest."""
    v0 = Cid.parse("QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o")
    assert (v0.version, v0.codec) == (0, DAG_PB)
    v1 = Cid(1, DAG_PB, v0.digest)
    assert Cid.parse(str(v1)) == v1
    assert Cid.parse("f" + v1.to_bytes().hex()) == v1
    raw = Cid.parse("bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4")
    assert raw.codec == RAW
    assert raw.digest == hashlib.sha256(b"hello world\n").digest()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Qm123",
        "not-a-cid",
        "x" + "a" * 40,
        # CIDv1 with an identity multihash: would "verify" anything.
        "f01551100",
        # CIDv1 with an unknown codec (dag-cbor, 0x71).
        "f017112" + "20" + "00" * 32,
    ],
)
def test_parse_rejects_malformed_or_unsupported(text: str) -> None:
    """Malformed CIDs, non-sha2-256 hashes and non-file codecs are refused."""
    with pytest.raises(CidError):
        Cid.parse(text)


def test_parse_refuses_long_text_before_decoding() -> None:
    """Text longer than any CID is refused before base58 decoding, whose time grows with the square
    of the length (200 KB took seconds): a Registry URI is any text the node returns."""
    started = time.monotonic()
    with pytest.raises(CidError, match="200001 characters, at most 128"):
        Cid.parse("z" + "2" * 200_000)
    assert time.monotonic() - started < 0.5
    assert clean_uri("z" + "2" * 200_000) == "z" + "2" * 200_000  # not a CID: left as it is (a path)
    hex_v1 = "f" + Cid.parse("bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4").to_bytes().hex()
    assert len(hex_v1) < MAX_CID_TEXT  # the longest form of a CID the daemon accepts
    assert Cid.parse(hex_v1).codec == RAW


def test_verify_content_detects_mismatch() -> None:
    """Whole content that does not rebuild to the CID is a mismatch, for v0 and raw v1."""
    for version in (0, 1):
        cid = build_dag(b"the real content", cid_version=version).root
        verify_content(cid, b"the real content")
        with pytest.raises(CidMismatch):
            verify_content(cid, b"something else")


class Blocks:
    """A block store that counts fetches."""

    def __init__(self, blocks: dict[str, bytes], limit: int = 100_000) -> None:
        self.blocks = dict(blocks)
        self.fetched: list[str] = []
        self.limit = limit

    async def get(self, cid: Cid) -> bytes:
        self.fetched.append(str(cid))
        if len(self.fetched) > self.limit:
            raise AssertionError(f"more than {self.limit} block fetches")
        return self.blocks[str(cid)]


@aio_test
async def test_fetch_verified_multi_block_dag() -> None:
    """A multi-block file is reassembled in order from block fetches, each block checked."""
    content = pattern(600000)
    for version in (0, 1):
        built = build_dag(content, cid_version=version)
        store = Blocks(built.blocks)
        assert await fetch_verified(built.root, store.get, max_size=10**6) == content
        # Root + 2 leaves: the first two 256 KiB chunks of the pattern are equal, one block fetched once.
        assert sorted(store.fetched) == sorted(built.blocks)
        assert len(store.fetched) == 3


@aio_test
async def test_fetch_verified_non_default_chunking() -> None:
    """Content added with another chunk size still verifies block by block."""
    content = pattern(5000)
    built = build_dag(content, chunk_size=1024)
    assert await fetch_verified(built.root, Blocks(built.blocks).get, max_size=10**6) == content
    with pytest.raises(CidMismatch):
        verify_content(built.root, content)  # whole-content check assumes defaults


@aio_test
async def test_fetch_verified_detects_a_tampered_leaf() -> None:
    """A leaf whose bytes differ from its CID fails the whole fetch."""
    built = build_dag(pattern(600000))
    store = Blocks(built.blocks)
    links, _ = parse_dag_pb(built.blocks[str(built.root)])
    store.blocks[str(links[1].cid)] = b"\x0a\x02\x08\x02"
    with pytest.raises(CidMismatch):
        await fetch_verified(built.root, store.get, max_size=10**6)


@aio_test
async def test_fetch_verified_enforces_max_size() -> None:
    """A DAG announcing more than the limit is refused before its leaves are fetched."""
    built = build_dag(pattern(600000))
    store = Blocks(built.blocks)
    with pytest.raises(CidError, match="larger than"):
        await fetch_verified(built.root, store.get, max_size=1000)
    assert len(store.fetched) == 1


@aio_test
async def test_fetch_verified_refuses_a_directory() -> None:
    """A UnixFS directory is not a metadata document."""
    directory = b"\x0a\x02\x08\x01"  # PBNode{Data: UnixFS{Type: Directory}}
    cid = Cid.of_block(directory, codec=DAG_PB, version=0)
    with pytest.raises(CidError, match="directory"):
        await fetch_verified(cid, Blocks({str(cid): directory}).get, max_size=100)


def _file_node(links: list[Cid], filesize: int = 0) -> bytes:
    """A dag-pb UnixFS file node linking ``links`` in order."""
    return _encode_dag_pb([PbLink(cid, "", 0) for cid in links], _encode_unixfs(2, None, filesize, []))


@aio_test
async def test_fetch_verified_bounds_the_nodes_of_a_fanout_dag() -> None:
    """Links to an empty block add no bytes: three levels of 300 (a 12 KB root, every block valid)
    would be 27 million visits of a 0-byte file.  The walk stops at max_blocks(max_size) nodes, and
    each distinct block is fetched once."""
    blocks: dict[str, bytes] = {}
    node = Cid.of_block(b"", codec=RAW, version=1)
    blocks[str(node)] = b""
    for _level in range(3):
        block = _file_node([node] * 300)
        node = Cid.of_block(block, codec=DAG_PB, version=1)
        blocks[str(node)] = block
    store = Blocks(blocks, limit=10_000)
    max_size = 4 * 1024 * 1024
    with pytest.raises(CidError, match=f"more than {max_blocks(max_size)} nodes"):
        await fetch_verified(node, store.get, max_size=max_size)
    assert len(store.fetched) == 4


@aio_test
async def test_fetch_verified_small_chunks_and_repeated_blocks_within_the_bounds() -> None:
    """A 4 MiB file in 1 KiB chunks (4,096 leaves and 25 inner nodes) is within max_blocks; its
    repeated chunks (the pattern repeats every 64 KiB) are fetched once and placed every time."""
    max_size = 4 * 1024 * 1024
    content = pattern(max_size)
    built = build_dag(content, chunk_size=1024)
    store = Blocks(built.blocks)
    assert await fetch_verified(built.root, store.get, max_size=max_size) == content
    assert sorted(store.fetched) == sorted(built.blocks)
    assert len(store.fetched) < 200


@aio_test
async def test_fetch_verified_bounds_the_bytes_of_blocks() -> None:
    """Blocks whose bytes are not content (here unused UnixFS block sizes) count too: at most
    twice max_size of blocks is fetched."""
    padding = _encode_unixfs(2, None, 0, [1] * 30_000)  # 60 KB of blocksizes, no content
    blocks: dict[str, bytes] = {}
    chain: list[Cid] = []
    for level in range(20):
        block = _encode_dag_pb([PbLink(chain[-1], "", 0)] if chain else [], padding + bytes([0x28, level]))
        chain.append(Cid.of_block(block, codec=DAG_PB, version=1))
        blocks[str(chain[-1])] = block
    store = Blocks(blocks)
    with pytest.raises(CidError, match="bytes of blocks for 100000 bytes of content"):
        await fetch_verified(chain[-1], store.get, max_size=100_000)
    assert len(store.fetched) <= 5
