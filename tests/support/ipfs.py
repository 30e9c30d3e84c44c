"""A small Kubo-API (IPFS HTTP API) server for tests, with real CIDs.

No IPFS node can be installed here, so this stands in for one.  It stores
what is added under the CIDs kubo would give (``ipfs add`` defaults: CIDv0,
dag-pb UnixFS leaves, 256 KiB chunks, balanced DAG; CIDv1 with raw leaves on
``cid-version=1``), built by :func:`snet_daemon.blockchain.cid.build_dag`,
whose output is pinned to vectors from the reference JS importer in
``tests/test_metadata_cid.py``.  So CIDs verify in the daemon's loader and in
the real snet-sdk / snet-cli.

Endpoints (GET and POST alike, as ipfshttpclient 0.4.13.2 uses GET):

* ``/api/v0/version`` -- reports 0.4.23: the clients' ipfshttpclient accepts
  only 0.4.18 <= version < 0.5.0, and refuses 0.4.20;
* ``/api/v0/cat?arg=<cid>``, ``/api/v0/block/get?arg=<cid>``;
* ``/api/v0/add`` (multipart; ``cid-version``, ``raw-leaves``,
  ``only-hash``), answering one JSON line per file as kubo does;
* ``/api/v0/pin/add`` (no-op) and ``/api/v0/id``;
* ``/ipfs/<cid>`` -- a path gateway, for ``filecoin://`` (Lighthouse) URIs;
* any path put in :attr:`IpfsServer.pages` -- plain HTTP documents.

It runs in a thread, not in the test's event loop, so synchronous helpers
(publishing from a fixture) and the daemon's async loader can both use it.
Fault injection: :meth:`IpfsServer.tamper`, :attr:`IpfsServer.disabled`,
:attr:`IpfsServer.fail_status`.
"""

from __future__ import annotations

import atexit
import email.parser
import email.policy
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from snet_daemon.blockchain.cid import Cid, CidError, build_dag

__all__ = ["IpfsServer", "ipfs", "shared_ipfs"]

#: What /api/v0/version reports (see the module docstring).
VERSION = "0.4.23"


class IpfsServer:
    """The server and its content store.

    Attributes:
        blocks: Block bytes by CID string.
        files: Whole content by root CID string (what ``cat`` serves).
        disabled: API commands (``"block/get"``, ``"cat"``...) answered with
            404, as by an API that does not offer them.
        fail_status: When set, every request is answered with this status.
        requests: ``"METHOD /path"`` of every request, in order.
    """

    def __init__(self, port: int = 0) -> None:
        self.blocks: dict[str, bytes] = {}
        self.files: dict[str, bytes] = {}
        self.disabled: set[str] = set()
        self.fail_status: int | None = None
        self.requests: list[str] = []
        #: Plain HTTP documents by path (for ``http://`` metadata URIs).
        self.pages: dict[str, bytes] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on."""
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the API (``ipfs_endpoint``)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def gateway(self) -> str:
        """Gateway prefix (``lighthouse_endpoint``): ``<gateway><cid>`` is the content."""
        return f"{self.url}/ipfs/"

    @property
    def multiaddr(self) -> str:
        """The API as a multiaddr (``SNET_IPFS_ENDPOINT`` / snet-cli ``default_ipfs_endpoint``)."""
        return f"/ip4/127.0.0.1/tcp/{self.port}/http"

    def start(self) -> IpfsServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="ipfs-test-server", daemon=True)
        self._thread.start()
        atexit.register(self.stop)
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)
            self._thread = None

    def reset_faults(self) -> None:
        """Undo :attr:`disabled` and :attr:`fail_status`."""
        self.disabled.clear()
        self.fail_status = None

    # -- content ------------------------------------------------------------

    def add(self, content: bytes, *, cid_version: int = 0, chunk_size: int = 256 * 1024) -> str:
        """Store ``content`` as ``ipfs add`` would and return its CID."""
        built = build_dag(content, cid_version=cid_version, chunk_size=chunk_size)
        self.blocks.update(built.blocks)
        self.files[str(built.root)] = content
        return str(built.root)

    def add_json(self, document: Any, *, cid_version: int = 0) -> str:
        """Store a JSON document (as snet-cli publishes metadata) and return its CID."""
        return self.add(json.dumps(document, indent=4).encode(), cid_version=cid_version)

    def tamper(self, cid: str, content: bytes) -> None:
        """Serve ``content`` for ``cid`` (its root block and its file) from now on."""
        self.blocks[cid] = content
        self.files[cid] = content

    # -- HTTP -----------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Any, body: bytes) -> tuple[int, str, bytes]:
        """Answer one request: (status, content type, body)."""
        self.requests.append(f"{method} {target}")
        if self.fail_status is not None:
            return _error(self.fail_status, "injected failure")
        parts = urlsplit(target)
        query = parse_qs(parts.query)
        path = parts.path.rstrip("/")
        if path.startswith("/ipfs/"):
            content = self.files.get(path[len("/ipfs/") :])
            if content is None:
                return 404, "text/plain", b"ipfs resolve: no link named"
            return 200, "application/octet-stream", content
        if path in self.pages:
            return 200, "application/json", self.pages[path]
        if not path.startswith("/api/v0/"):
            return 404, "text/plain", b"404 page not found"
        command = path[len("/api/v0/") :]
        if command in self.disabled:
            return 404, "text/plain", b"404 page not found"
        arg = unquote(query.get("arg", [""])[0]).removeprefix("/ipfs/").strip("/")
        if command == "version":
            return _json({"Version": VERSION, "Commit": "", "Repo": "7", "System": "amd64/linux", "Golang": "go1.13"})
        if command == "id":
            return _json({"ID": "QmTestServer", "AgentVersion": f"go-ipfs/{VERSION}/", "ProtocolVersion": "ipfs/0.1.0"})
        if command in ("cat", "block/get"):
            store = self.files if command == "cat" else self.blocks
            try:
                Cid.parse(arg)
            except CidError as exc:
                return _error(500, f"invalid path {arg!r}: {exc}")
            content = store.get(arg)
            if content is None:
                return _error(500, f"block was not found locally (offline): ipld: could not find {arg}")
            return 200, "text/plain", content
        if command == "pin/add":
            return _json({"Pins": [arg]})
        if command == "add":
            return self._add(headers, body, query)
        return _error(404, f"unknown command {command!r}")

    def _add(self, headers: Any, body: bytes, query: dict[str, list[str]]) -> tuple[int, str, bytes]:
        version = int(query.get("cid-version", ["0"])[0])
        only_hash = query.get("only-hash", ["false"])[0] == "true"
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {headers.get('Content-Type', '')}\r\n\r\n".encode() + body
        )
        lines = []
        for part in _file_parts(message):
            content = part.get_payload(decode=True) or b""
            name = unquote(part.get_filename() or part.get_param("name", header="content-disposition") or "")
            built = build_dag(content, cid_version=version)
            if not only_hash:
                self.blocks.update(built.blocks)
                self.files[str(built.root)] = content
            lines.append(
                json.dumps({"Name": name or str(built.root), "Hash": str(built.root), "Size": str(built.size)})
            )
        if not lines:
            return _error(400, "no file in the multipart body")
        return 200, "application/json", ("\n".join(lines) + "\n").encode()


def _file_parts(message: Any) -> Iterator[Any]:
    """The leaf parts of a multipart body that carry file content."""
    if message.is_multipart():
        for part in message.iter_parts():
            yield from _file_parts(part)
    elif message.get_content_type() != "application/x-directory":
        yield message


def _json(document: Any) -> tuple[int, str, bytes]:
    return 200, "application/json", json.dumps(document).encode()


def _error(status: int, message: str) -> tuple[int, str, bytes]:
    """A kubo-style error answer."""
    return status, "application/json", json.dumps({"Message": message, "Code": 0, "Type": "error"}).encode()


def _handler(server: IpfsServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                # ipfshttpclient streams multipart bodies (requests with a generator).
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline().strip():  # trailers
                            pass
                        break
                    body += self.rfile.read(size)
                    self.rfile.readline()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
            status, content_type, answer = server.handle(self.command, self.path, self.headers, body)
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        do_GET = _serve
        do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet

    return Handler


_shared: IpfsServer | None = None


def shared_ipfs() -> IpfsServer:
    """The process-wide test IPFS server, started on first use."""
    global _shared
    if _shared is None:
        _shared = IpfsServer().start()
    return _shared


@pytest.fixture
def ipfs() -> Iterator[IpfsServer]:
    """The shared test IPFS server; injected faults are undone after the test."""
    server = shared_ipfs()
    try:
        yield server
    finally:
        server.reset_faults()
