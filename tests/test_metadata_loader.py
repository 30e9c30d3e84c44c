"""Metadata URIs to verified bytes: IPFS, Filecoin gateway, HTTP and files."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from snet_daemon.blockchain.cid import build_dag
from snet_daemon.blockchain.errors import MetadataError, MetadataFetchError
from snet_daemon.blockchain.loader import MetadataLoader, clean_uri
from tests.support.aio import aio_fixture, aio_test
from tests.support.ipfs import IpfsServer, ipfs  # noqa: F401 - fixture
from tests.support.ports import free_port

DOC = json.dumps({"display_name": "x", "groups": []}).encode()


@aio_fixture
async def loader(ipfs: IpfsServer) -> AsyncIterator[MetadataLoader]:  # noqa: F811
    """A loader pointed at the test IPFS server (API and gateway)."""
    made = MetadataLoader(ipfs_endpoint=ipfs.url, lighthouse_endpoint=ipfs.gateway, timeout=5)
    yield made
    await made.close()


def test_clean_uri() -> None:
    """Registry URIs lose their NUL padding; a bare CID becomes ipfs://."""
    cid = "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert clean_uri(f"ipfs://{cid}".encode().ljust(64, b"\0")) == f"ipfs://{cid}"
    assert clean_uri(cid.encode() + b"\0\0") == f"ipfs://{cid}"
    assert clean_uri(b"filecoin://bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4\0").startswith(
        "filecoin://"
    )
    assert clean_uri("  ./local.json ") == "./local.json"


@aio_test
async def test_ipfs_single_block(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """An ipfs:// document is fetched with block/get and verified."""
    cid = ipfs.add(DOC)
    assert await loader.load(f"ipfs://{cid}") == DOC
    assert any("/api/v0/block/get" in request for request in ipfs.requests)


@aio_test
async def test_ipfs_multi_block_v0_and_v1(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """A multi-block document (dag-pb or raw leaves) is reassembled and verified."""
    big = json.dumps({"blob": "x" * 700_000}).encode()
    for version in (0, 1):
        cid = ipfs.add(big, cid_version=version)
        assert await loader.load(f"ipfs://{cid}") == big


@aio_test
async def test_ipfs_cid_mismatch(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """Content that does not hash to its CID is refused (block/get and cat paths)."""
    cid = ipfs.add(b'{"real": true}')
    ipfs.tamper(cid, b'{"real": false}')
    with pytest.raises(MetadataError, match="does not match CID"):
        await loader.load(f"ipfs://{cid}")
    ipfs.disabled.add("block/get")
    with pytest.raises(MetadataError, match="does not match CID"):
        await loader.load(f"ipfs://{cid}")


@aio_test
async def test_ipfs_without_block_get_uses_cat(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """An API without block/get is asked for cat, and the content is verified whole."""
    cid = ipfs.add(DOC)
    ipfs.disabled.add("block/get")
    assert await loader.load(f"ipfs://{cid}") == DOC
    assert any("/api/v0/cat" in request for request in ipfs.requests)


@aio_test
async def test_ipfs_not_found_and_down(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """A missing CID and an unreachable API are fetch errors with the API's message."""
    missing = "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    ipfs.blocks.pop(missing, None)
    with pytest.raises(MetadataFetchError, match="could not find"):
        await loader.load(f"ipfs://{missing}")
    dead = MetadataLoader(ipfs_endpoint=f"http://127.0.0.1:{free_port()}", lighthouse_endpoint="", timeout=2)
    try:
        with pytest.raises(MetadataFetchError, match="IPFS block/get"):
            await dead.load(f"ipfs://{missing}")
    finally:
        await dead.close()


@aio_test
async def test_malformed_uris(loader: MetadataLoader) -> None:
    """A bad CID or an unknown scheme is a MetadataError, not a fetch error."""
    with pytest.raises(MetadataError, match="not a CID"):
        await loader.load("ipfs://nonsense")
    with pytest.raises(MetadataError, match="unsupported scheme 'ftp'"):
        await loader.load("ftp://host/file.json")
    with pytest.raises(MetadataError, match="empty"):
        await loader.load("")


@aio_test
async def test_filecoin_gateway(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """filecoin:// is fetched from the Lighthouse gateway and verified whole."""
    cid = ipfs.add(DOC, cid_version=1)
    assert await loader.load(f"filecoin://{cid}") == DOC
    ipfs.tamper(cid, b"{}")
    with pytest.raises(MetadataError, match="does not match CID"):
        await loader.load(f"filecoin://{cid}")
    ipfs.fail_status = 502
    with pytest.raises(MetadataFetchError, match="HTTP 502"):
        await loader.load(f"filecoin://{cid}")


@aio_test
async def test_http_and_gateway_urls(loader: MetadataLoader, ipfs: IpfsServer) -> None:  # noqa: F811
    """http(s):// documents are fetched; a /ipfs/<cid> gateway URL is also verified."""
    ipfs.pages["/metadata/service.json"] = DOC
    assert await loader.load(f"{ipfs.url}/metadata/service.json") == DOC
    with pytest.raises(MetadataFetchError, match="HTTP 404"):
        await loader.load(f"{ipfs.url}/metadata/missing.json")
    cid = ipfs.add(DOC)
    assert await loader.load(f"{ipfs.gateway}{cid}") == DOC
    ipfs.tamper(cid, b"[]")
    with pytest.raises(MetadataError, match="does not match CID"):
        await loader.load(f"{ipfs.gateway}{cid}")


@aio_test
async def test_files(loader: MetadataLoader, tmp_path: Path) -> None:
    """A plain path and a file:// URI are read from disk; a missing file is a fetch error."""
    path = tmp_path / "service metadata.json"
    path.write_bytes(DOC)
    assert await loader.load(str(path)) == DOC
    assert await loader.load(path.as_uri()) == DOC
    with pytest.raises(MetadataFetchError, match="cannot read metadata file"):
        await loader.load(str(tmp_path / "missing.json"))


@aio_test
async def test_size_limit(ipfs: IpfsServer, tmp_path: Path) -> None:  # noqa: F811
    """Documents over the size limit are refused from every source."""
    small = MetadataLoader(ipfs_endpoint=ipfs.url, lighthouse_endpoint=ipfs.gateway, timeout=5, max_size=100)
    try:
        cid = ipfs.add(b"x" * 1000)
        with pytest.raises(MetadataError, match=r"limit 100|larger than 100"):
            await small.load(f"ipfs://{cid}")
        with pytest.raises(MetadataFetchError, match=r"limit 100|larger than 100"):
            await small.load(f"{ipfs.gateway}{cid}")
        path = tmp_path / "big.json"
        path.write_bytes(b"x" * 1000)
        with pytest.raises(MetadataFetchError, match="limit 100"):
            await small.load(str(path))
    finally:
        await small.close()


@aio_test
async def test_test_server_speaks_the_kubo_api(ipfs: IpfsServer) -> None:  # noqa: F811
    """The test IPFS server reports a version the real clients accept and adds files under kubo's CIDs."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{ipfs.url}/api/v0/version") as response:
            version = (await response.json())["Version"]
        assert version.startswith("0.4.")
        assert version != "0.4.20"
        assert (0, 4, 18) <= tuple(int(part) for part in version.split(".")) < (0, 5, 0)
        form = aiohttp.FormData()
        form.add_field("file", b'{"added": "by multipart"}', filename="doc.json")
        async with session.post(f"{ipfs.url}/api/v0/add?stream-channels=true", data=form) as response:
            added = json.loads((await response.read()).splitlines()[0])
        assert added["Hash"] == str(build_dag(b'{"added": "by multipart"}').root)
        async with session.get(f"{ipfs.url}/api/v0/cat?arg={added['Hash']}") as response:
            assert await response.read() == b'{"added": "by multipart"}'


@aio_test
async def test_closed_loader_opens_no_new_pool(ipfs: IpfsServer) -> None:  # noqa: F811
    """After close (the daemon stopping) an HTTP load fails and opens no new connection pool:
    nobody would close it ("Unclosed client session" at exit)."""
    loader = MetadataLoader(ipfs_endpoint=ipfs.url, lighthouse_endpoint=ipfs.gateway, timeout=5)
    ipfs.pages["/metadata/service.json"] = DOC
    assert await loader.load(f"{ipfs.url}/metadata/service.json") == DOC
    await loader.close()
    with pytest.raises(MetadataFetchError, match="closed"):
        await loader.load(f"{ipfs.url}/metadata/service.json")
    assert loader._session is None
