"""Metadata URIs to bytes, checked against their CID wherever there is one.

Accepted URIs (the Registry's, and the local overrides
``service_metadata_uri`` / ``organization_metadata_uri``):

* ``ipfs://<cid>`` -- Kubo RPC API at ``ipfs_endpoint``.  Blocks are fetched
  with ``block/get`` and each is checked against its CID
  (:func:`~snet_daemon.blockchain.cid.fetch_verified`); an API that does not
  offer ``block/get`` is asked for ``cat`` instead and the whole content is
  checked by rebuilding its DAG with ``ipfs add`` defaults.
* ``filecoin://<cid>`` -- ``GET <lighthouse_endpoint><cid>``, checked the
  second way.
* ``http://...`` / ``https://...`` -- fetched as is; when the path is a
  gateway path ``/ipfs/<cid>`` the content is checked too.
* ``file:///path`` or a plain path -- read from disk (relative paths from the
  daemon's working directory).

A Registry URI is NUL-padded to a multiple of 32 bytes; :func:`clean_uri`
strips that, and a bare CID (no scheme) from the Registry is read as
``ipfs://``, as the Go daemon does.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

import aiohttp
from twisted.logger import Logger

from snet_daemon.blockchain.cid import Cid, CidError, CidMismatch, fetch_verified, verify_content
from snet_daemon.blockchain.errors import MetadataError, MetadataFetchError

__all__ = ["DEFAULT_MAX_SIZE", "MetadataLoader", "clean_uri"]

_log = Logger(namespace="snetd.metadata")

#: Largest metadata document accepted (real ones are a few KiB).
DEFAULT_MAX_SIZE = 4 * 1024 * 1024

_GATEWAY_PATH = re.compile(r"/ipfs/([A-Za-z0-9]+)/?$")
# HTTP statuses by which a Kubo-like API says "no such endpoint here".
_NO_ENDPOINT = frozenset({404, 405, 501})


def clean_uri(raw: bytes | str) -> str:
    """A Registry URI as text: NUL padding and surrounding blanks removed.

    A bare CID (no scheme) is returned as ``ipfs://<cid>``.
    """
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    text = text.replace("\0", "").strip()
    if text and "://" not in text:
        try:
            Cid.parse(text)
        except CidError:
            return text
        return f"ipfs://{text}"
    return text


class MetadataLoader:
    """Fetches metadata by URI and verifies it.

    Args:
        ipfs_endpoint: Kubo RPC API base URL (``ipfs_endpoint``).
        lighthouse_endpoint: Gateway URL prefix for ``filecoin://``.
        timeout: Seconds per HTTP request (``ipfs_timeout``).
        max_size: Largest document accepted, in bytes.
    """

    def __init__(
        self,
        *,
        ipfs_endpoint: str,
        lighthouse_endpoint: str,
        timeout: float,
        max_size: int = DEFAULT_MAX_SIZE,
    ) -> None:
        self.ipfs_endpoint = ipfs_endpoint.rstrip("/")
        self.lighthouse_endpoint = lighthouse_endpoint
        self._timeout = timeout
        self.max_size = max_size
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    async def close(self) -> None:
        """Close the HTTP connection pool, for good: later loads over HTTP fail with :class:`MetadataFetchError`."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        if self._closed:
            # A new pool now would never be closed ("Unclosed client session").
            raise MetadataFetchError("the metadata loader is closed (the daemon is stopping)")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._timeout))
        return self._session

    async def load(self, uri: str) -> bytes:
        """The verified content at ``uri``.

        Raises:
            MetadataFetchError: it could not be fetched (network, HTTP
                status, missing file, too large).
            MetadataError: the URI is malformed, or the content does not
                match its CID.
        """
        uri = uri.strip()
        scheme = uri.split("://", 1)[0].lower() if "://" in uri else ""
        if scheme in ("ipfs", "filecoin"):
            cid = self._cid(uri.split("://", 1)[1].strip("/"), uri)
            if scheme == "ipfs":
                return await self._from_ipfs(cid, uri)
            return await self._from_gateway(f"{self.lighthouse_endpoint}{cid}", cid, uri)
        if scheme in ("http", "https"):
            match = _GATEWAY_PATH.search(urlsplit(uri).path)
            gateway_cid = self._cid(match.group(1), uri) if match else None
            return await self._from_gateway(uri, gateway_cid, uri)
        if scheme == "file":
            return self._from_file(Path(unquote(urlsplit(uri).path)), uri)
        if scheme:
            raise MetadataError(f"metadata URI {uri!r}: unsupported scheme {scheme!r}")
        if not uri:
            raise MetadataError("metadata URI is empty")
        return self._from_file(Path(uri), uri)

    @staticmethod
    def _cid(text: str, uri: str) -> Cid:
        try:
            return Cid.parse(text)
        except CidError as exc:
            raise MetadataError(f"metadata URI {uri!r}: {exc}") from None

    def _from_file(self, path: Path, uri: str) -> bytes:
        try:
            size = path.stat().st_size
            if size > self.max_size:
                raise MetadataFetchError(f"metadata file {str(path)!r} is {size} bytes (limit {self.max_size})")
            return path.read_bytes()
        except OSError as exc:
            raise MetadataFetchError(f"cannot read metadata file {str(path)!r}: {exc.strerror or exc}") from None

    async def _request(self, method: str, url: str, what: str) -> tuple[int, bytes]:
        try:
            async with self._http().request(method, url) as response:
                if response.content_length is not None and response.content_length > self.max_size:
                    raise MetadataFetchError(f"{what}: {response.content_length} bytes (limit {self.max_size})")
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > self.max_size:
                        raise MetadataFetchError(f"{what}: larger than {self.max_size} bytes")
                    chunks.append(chunk)
                return response.status, b"".join(chunks)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise MetadataFetchError(f"{what}: {type(exc).__name__}: {exc}".rstrip(": ")) from None

    async def _from_gateway(self, url: str, cid: Cid | None, uri: str) -> bytes:
        status, body = await self._request("GET", url, f"fetching {uri}")
        if status != 200:
            raise MetadataFetchError(f"fetching {uri}: HTTP {status}: {body[:200].decode(errors='replace')}")
        if cid is not None:
            self._verify(cid, body, uri)
        return body

    def _verify(self, cid: Cid, content: bytes, uri: str) -> None:
        try:
            verify_content(cid, content)
        except CidMismatch as exc:
            raise MetadataError(f"metadata at {uri}: {exc}") from None

    async def _api(self, command: str, cid: Cid, uri: str) -> tuple[int, bytes]:
        url = f"{self.ipfs_endpoint}/api/v0/{command}?arg={quote(str(cid))}"
        return await self._request("POST", url, f"IPFS {command} {cid} ({uri})")

    async def _from_ipfs(self, cid: Cid, uri: str) -> bytes:
        status, first = await self._api("block/get", cid, uri)
        if status in _NO_ENDPOINT:
            _log.info("IPFS API {endpoint} has no block/get; using cat", endpoint=self.ipfs_endpoint)
            status, body = await self._api("cat", cid, uri)
            self._check_status(status, body, f"IPFS cat {cid}")
            self._verify(cid, body, uri)
            return body
        self._check_status(status, first, f"IPFS block/get {cid}")

        async def get_block(block_cid: Cid) -> bytes:
            if block_cid == cid:
                return first
            status, block = await self._api("block/get", block_cid, uri)
            self._check_status(status, block, f"IPFS block/get {block_cid}")
            return block

        try:
            return await fetch_verified(cid, get_block, max_size=self.max_size)
        except CidMismatch as exc:
            raise MetadataError(f"metadata at {uri}: {exc}") from None
        except CidError as exc:
            raise MetadataError(f"metadata at {uri}: {exc}") from None

    @staticmethod
    def _check_status(status: int, body: bytes, what: str) -> None:
        if status == 200:
            return
        message = body[:300].decode(errors="replace")
        match = re.search(r'"Message"\s*:\s*"([^"]*)"', message)
        raise MetadataFetchError(f"{what}: HTTP {status}: {match.group(1) if match else message}")
