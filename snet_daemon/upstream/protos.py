"""The service's ``.proto`` files: from ``service_api_source`` to message classes.

The service metadata's ``service_api_source`` (or the legacy
``model_ipfs_hash``) names a tar archive (optionally gzip/bzip2/xz
compressed) of the service's ``.proto`` files.  :func:`load_protos` fetches
it, unpacks it in memory with strict limits, compiles it with grpcio-tools'
``protoc`` (a subprocess: no network, the well-known types bundled with
grpcio-tools, ``--include_imports``) into a ``FileDescriptorSet``, and builds
a *private* :class:`~google.protobuf.descriptor_pool.DescriptorPool` from it:
the default pool holds the daemon's own protos, and a service is free to
define ``escrow.PaymentChannelStateService`` or anything else.

:class:`ServiceProtos` then answers, per gRPC method path
(``/package.Service/Method``), its input and output message classes and
whether each direction streams (:class:`MethodInfo`).  The JSON-speaking
adapters use it to convert protobuf to JSON and back (proto3 JSON mapping,
original proto field names, as the Go daemon's ``http`` type does).

The last part of this module is shared by the ``jsonrpc`` and ``http``
adapters: how one call's messages become JSON values and back
(:class:`JsonMessages`) and how the four call kinds map onto request/answer
exchanges (:func:`relay_json`); ``docs/service-types.md`` describes it for
service authors.
"""

from __future__ import annotations

import asyncio
import bz2
import io
import lzma
import os
import posixpath
import re
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final, Protocol

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from snet_daemon import jsontext
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status

__all__ = [
    "MAX_ARCHIVE_FILES",
    "MAX_FILE_SIZE",
    "MAX_TOTAL_SIZE",
    "Fetcher",
    "JsonMessages",
    "MethodInfo",
    "ProtoError",
    "ServiceProtos",
    "api_source_uri",
    "client_sends_json",
    "compile_descriptor_set",
    "extract_proto_files",
    "load_protos",
    "relay_json",
    "request_text",
    "short_name",
]

#: Most members an archive may have (real ones have a handful).
MAX_ARCHIVE_FILES: Final = 1000
#: Largest single member, uncompressed.
MAX_FILE_SIZE: Final = 4 * 1024 * 1024
#: Largest archive content, uncompressed (a bound on decompression bombs).
MAX_TOTAL_SIZE: Final = 32 * 1024 * 1024
#: Seconds ``protoc`` may run.
COMPILE_TIMEOUT: Final = 60.0
#: Longest compiler output quoted in an error.
_ERROR_EXCERPT: Final = 2000
#: Most bytes of ``protoc``'s stdout, and of its stderr, kept.
_OUTPUT_LIMIT: Final = 64 * 1024
#: Environment variables ``protoc``'s Python may need.
_COMPILER_ENV: Final = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL")


class ProtoError(Exception):
    """The service's protos cannot be used: unsafe or broken archive, compile error.

    The message says which, in words an operator can act on; it never
    contains anything but the archive's own file names and ``protoc``'s
    diagnostics.
    """


class Fetcher(Protocol):
    """Fetches the bytes behind a URI (:class:`snet_daemon.blockchain.loader.MetadataLoader`)."""

    async def load(self, uri: str) -> bytes:
        """The content at ``uri`` (a path, ``file://``, ``http(s)://``, ``ipfs://``, ``filecoin://``).

        Raises:
            Exception: any failure; its text is reported with the URI.
        """


def api_source_uri(service_api_source: str, model_ipfs_hash: str) -> str:
    """The URI of the service's proto archive from its metadata, or ``""``.

    ``service_api_source`` wins; the legacy ``model_ipfs_hash`` is a bare
    IPFS CID, read as ``ipfs://<cid>`` (what the Go daemon does).
    """
    if service_api_source.strip():
        return service_api_source.strip()
    if model_ipfs_hash.strip():
        cid = model_ipfs_hash.strip()
        return cid if "://" in cid else f"ipfs://{cid}"
    return ""


# --------------------------------------------------------------------------
# Archive -> files -> FileDescriptorSet -> pool.


def _safe_name(name: str) -> str:
    """A member name as a relative POSIX path, or raise :class:`ProtoError`."""
    if "\\" in name or "\0" in name:
        raise ProtoError(f"archive member {name!r}: unsupported characters in the name")
    if name.startswith("/"):
        raise ProtoError(f"archive member {name!r}: absolute paths are not allowed")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if any(part == ".." for part in parts):
        raise ProtoError(f"archive member {name!r}: '..' is not allowed in paths")
    if parts and parts[0][:1] in ("-", "@"):
        # protoc would read it as an option (--x_out=...) or an argument file.
        raise ProtoError(f"archive member {name!r}: a name may not start with '-' or '@'")
    return "/".join(parts)


def _decompressed(archive: bytes, limit: int) -> bytes:
    """The tar inside a gzip, bzip2 or xz ``archive`` (or ``archive`` itself), at most ``limit`` bytes.

    Inflated here, with a hard cap, rather than by ``tarfile``: it reads some
    headers (GNU long names, pax) whole into memory before any limit of ours
    applies, and a few hundred compressed bytes can declare gigabytes.

    Raises:
        ProtoError: the content is larger than ``limit``.
    """
    decompressor: Any = None
    if archive[:2] == b"\x1f\x8b":
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif archive[:3] == b"BZh":
        decompressor = bz2.BZ2Decompressor()
    elif archive[:6] == b"\xfd7zXZ\x00":
        decompressor = lzma.LZMADecompressor()
    raw = archive if decompressor is None else decompressor.decompress(archive, limit + 1)
    if len(raw) > limit:
        raise ProtoError(f"archive content is larger than {limit} bytes")
    return raw


def extract_proto_files(archive: bytes) -> dict[str, bytes]:
    """The ``.proto`` files of a tar archive, by relative path, read in memory.

    Directories are skipped, as are regular files that are not ``.proto``;
    links, devices and FIFOs are refused, as are absolute paths, ``..``
    components and archives over the limits (:data:`MAX_ARCHIVE_FILES`,
    :data:`MAX_FILE_SIZE`, :data:`MAX_TOTAL_SIZE`).  Nothing touches the
    disk.

    Raises:
        ProtoError: not a tar archive, an unsafe member, over a limit, or no
            ``.proto`` file at all.
    """
    try:
        # Members' content plus a 512-byte header and padding each, and the
        # end-of-archive blocks.
        raw = _decompressed(archive, MAX_TOTAL_SIZE + (MAX_ARCHIVE_FILES + 20) * 1024)
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        raise ProtoError(f"not a tar archive (tar, tar.gz, tar.bz2 or tar.xz): {exc}") from None
    files: dict[str, bytes] = {}
    total = members = 0
    with tar:
        try:
            for member in tar:
                members += 1
                if members > MAX_ARCHIVE_FILES:
                    raise ProtoError(f"archive has more than {MAX_ARCHIVE_FILES} members")
                name = _safe_name(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise ProtoError(f"archive member {member.name!r}: only regular files are allowed (no links)")
                if member.size > MAX_FILE_SIZE:
                    raise ProtoError(f"archive member {member.name!r} is {member.size} bytes (limit {MAX_FILE_SIZE})")
                total += member.size
                if total > MAX_TOTAL_SIZE:
                    raise ProtoError(f"archive content is larger than {MAX_TOTAL_SIZE} bytes")
                if not name.endswith(".proto"):
                    continue
                if name in files:
                    raise ProtoError(f"archive member {member.name!r} appears twice")
                reader = tar.extractfile(member)
                if reader is None:  # pragma: no cover - isfile() members always have data
                    continue
                files[name] = reader.read()
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise ProtoError(f"corrupt tar archive: {exc}") from None
    if not files:
        raise ProtoError("archive contains no .proto file")
    return files


class _Compiler(ProcessProtocol):
    """One ``protoc`` run: its output, bounded, and its end.

    Only the start of each stream is kept (:data:`_OUTPUT_LIMIT`): its
    diagnostics are quoted shortened anyway, and a broken or hostile
    archive must not make the daemon hold whatever ``protoc`` prints.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        #: stdout and stderr, each at most :data:`_OUTPUT_LIMIT` bytes.
        self.output = (bytearray(), bytearray())
        #: Resolves with the exit status (None: killed by a signal).
        self.ended: asyncio.Future[int | None] = loop.create_future()
        self._running = True

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD in (1, 2):
            kept = self.output[childFD - 1]
            kept += data[: max(_OUTPUT_LIMIT - len(kept), 0)]

    def processEnded(self, reason: Failure) -> None:
        self._running = False
        if not self.ended.done():
            self.ended.set_result(getattr(reason.value, "exitCode", None))

    def stop(self) -> None:
        """Kill ``protoc`` if it still runs."""
        if self._running and self.transport is not None:
            try:
                self.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass


async def compile_descriptor_set(
    files: Mapping[str, bytes],
    reactor: IReactorProcess,
    *,
    python: str = sys.executable,
    time_limit: float = COMPILE_TIMEOUT,
) -> bytes:
    """Compile ``files`` with grpcio-tools' ``protoc`` into a serialized ``FileDescriptorSet``.

    ``protoc`` runs as ``python -m grpc_tools.protoc`` in a temporary
    directory holding the files (imports resolve against the archive root
    and grpcio-tools' bundled well-known types), with ``--include_imports``
    so the set is self-contained.

    Args:
        files: relative path -> content (from :func:`extract_proto_files`).
        reactor: spawns ``protoc``.
        python: the interpreter with grpcio-tools installed.
        time_limit: seconds ``protoc`` may take; then (or when the caller is
            cancelled) it is killed.

    Raises:
        ProtoError: the files do not compile (with ``protoc``'s diagnostics),
            or grpcio-tools is not installed.
    """
    with tempfile.TemporaryDirectory(prefix="snetd-protos-") as tmp:
        root = Path(tmp) / "src"
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        out = Path(tmp) / "descriptors.pb"
        args = [
            "-m",
            "grpc_tools.protoc",
            "-I.",
            "--include_imports",
            f"--descriptor_set_out={out}",
            *sorted(files),
        ]
        # Only what Python needs to find grpcio-tools; never the daemon's
        # own settings (SNET_* variables may hold keys).
        env = {key: os.environ[key] for key in _COMPILER_ENV if key in os.environ}
        compiler = _Compiler(asyncio.get_running_loop())
        reactor.spawnProcess(compiler, python, [python, *args], env=env, path=str(root))
        try:
            async with asyncio.timeout(time_limit):
                code = await compiler.ended
        except TimeoutError:
            raise ProtoError(f"protoc did not finish in {time_limit:g}s") from None
        finally:
            compiler.stop()  # given up on (time limit, cancellation): it must not run on
        if code != 0:
            stdout, stderr = compiler.output
            text = (stderr or stdout).decode("utf-8", errors="replace").replace(f"{root}/", "").strip()
            text = text or f"protoc {'was killed' if code is None else f'exited with status {code}'}"
            # Python quotes the name ("No module named 'grpc_tools'").
            if re.search(r"No module named '?grpc_tools\b", text):
                raise ProtoError("compiling the service's protos needs grpcio-tools, which is not installed")
            if len(text) > _ERROR_EXCERPT:
                text = text[:_ERROR_EXCERPT] + "..."
            raise ProtoError(f"the service's .proto files do not compile:\n{text}")
        return out.read_bytes()


def _check_shape(value: Any, message: Message) -> None:
    """Only a JSON object can be a message (well-known types have their own JSON forms)."""
    if not isinstance(value, dict) and not message.DESCRIPTOR.full_name.startswith("google.protobuf."):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class MethodInfo:
    """One RPC method of the service, from its protos.

    Attributes:
        path: ``/package.Service/Method``, as gRPC names it on the wire.
        name: ``Method`` (what JSON-RPC, HTTP and process services are told).
        input_type: the request message class.
        output_type: the reply message class.
        client_streaming: the client sends a stream of messages.
        server_streaming: the service answers with a stream of messages.
        pool: the pool the classes belong to (resolves ``Any`` in JSON).
    """

    path: str
    name: str
    input_type: type[Message]
    output_type: type[Message]
    client_streaming: bool
    server_streaming: bool
    pool: descriptor_pool.DescriptorPool

    def request_to_json(self, data: bytes) -> Any:
        """A protobuf request as a JSON value (original field names).

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` when ``data`` is not a valid
                request message, or has no JSON form (a ``Timestamp`` with
                nanos over 10^9, say: it parses, but cannot be printed).
        """
        message = self.input_type()
        try:
            message.ParseFromString(data)
            return json_format.MessageToDict(message, preserving_proto_field_name=True, descriptor_pool=self.pool)
        except (DecodeError, json_format.Error, ValueError, TypeError) as exc:
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"request is not a valid {self.input_type.DESCRIPTOR.full_name}: {exc}"
            ) from None

    def request_from_json(self, value: Any) -> bytes:
        """A JSON request as protobuf bytes (unknown fields are an error: they are the client's).

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` when ``value`` does not fit the
                request type.
        """
        message = self.input_type()
        try:
            _check_shape(value, message)
            json_format.ParseDict(value, message, descriptor_pool=self.pool)
        except (json_format.Error, ValueError, TypeError) as exc:
            raise GrpcError(
                Status.INVALID_ARGUMENT, f"request does not match {self.input_type.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return message.SerializeToString()

    def reply_from_json(self, value: Any) -> bytes:
        """A service's JSON answer as reply bytes; unknown fields are ignored (as Go does).

        Raises:
            GrpcError: ``INTERNAL`` when the answer does not fit the reply
                type (the service's fault, not the client's).
        """
        message = self.output_type()
        if value is None:
            value = {}  # a JSON-RPC "result": null, an empty HTTP body: the empty message
        try:
            _check_shape(value, message)
            json_format.ParseDict(value, message, ignore_unknown_fields=True, descriptor_pool=self.pool)
        except (json_format.Error, ValueError, TypeError) as exc:
            raise GrpcError(
                Status.INTERNAL, f"service answer does not match {self.output_type.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return message.SerializeToString()

    def reply_to_json(self, data: bytes) -> Any:
        """A service's protobuf answer as a JSON value.

        Raises:
            GrpcError: ``INTERNAL`` when ``data`` is not a valid reply, or
                has no JSON form (as :meth:`request_to_json`): the service's
                fault, said in words rather than as an unexpected error.
        """
        message = self.output_type()
        try:
            message.ParseFromString(data)
            return json_format.MessageToDict(message, preserving_proto_field_name=True, descriptor_pool=self.pool)
        except (DecodeError, json_format.Error, ValueError, TypeError) as exc:
            raise GrpcError(
                Status.INTERNAL, f"service answer is not a valid {self.output_type.DESCRIPTOR.full_name}: {exc}"
            ) from None


class ServiceProtos:
    """The methods of a compiled set of protos, in a private descriptor pool.

    Args:
        descriptor_set: a serialized ``FileDescriptorSet`` that includes
            every import (``protoc --include_imports``).

    Raises:
        ProtoError: the set is malformed or inconsistent.
    """

    def __init__(self, descriptor_set: bytes) -> None:
        files = descriptor_pb2.FileDescriptorSet()
        try:
            files.ParseFromString(descriptor_set)
        except DecodeError as exc:
            raise ProtoError(f"invalid FileDescriptorSet: {exc}") from None
        self.pool = descriptor_pool.DescriptorPool()
        try:
            for file in files.file:
                self.pool.Add(file)
            methods: dict[str, MethodInfo] = {}
            for file in files.file:
                for service in file.service:
                    full = f"{file.package}.{service.name}" if file.package else service.name
                    for method in self.pool.FindServiceByName(full).methods:
                        info = self._info(full, method)
                        methods[info.path] = info
        except (TypeError, KeyError, ValueError) as exc:
            raise ProtoError(f"inconsistent protos: {exc}") from None
        #: Every method, by ``/package.Service/Method``.
        self.methods: Mapping[str, MethodInfo] = MappingProxyType(methods)
        #: Names of the files compiled (dependencies included).
        self.files: tuple[str, ...] = tuple(file.name for file in files.file)

    def _info(self, service: str, method: MethodDescriptor) -> MethodInfo:
        return MethodInfo(
            path=f"/{service}/{method.name}",
            name=method.name,
            input_type=message_factory.GetMessageClass(method.input_type),
            output_type=message_factory.GetMessageClass(method.output_type),
            client_streaming=bool(method.client_streaming),
            server_streaming=bool(method.server_streaming),
            pool=self.pool,
        )

    def method(self, path: str) -> MethodInfo | None:
        """The method called as ``path`` (``/package.Service/Method``), or None."""
        return self.methods.get(path)

    def require(self, path: str) -> MethodInfo:
        """The method called as ``path``.

        Raises:
            GrpcError: ``UNIMPLEMENTED`` when the service's protos do not
                define it.
        """
        info = self.methods.get(path)
        if info is None:
            raise GrpcError(Status.UNIMPLEMENTED, f"method {path} is not defined in the service's protos")
        return info

    def __iter__(self) -> Iterator[MethodInfo]:
        return iter(self.methods.values())


async def load_protos(uri: str, fetch: Fetcher, reactor: IReactorProcess) -> ServiceProtos:
    """Fetch, unpack and compile the service's protos.

    A URI whose path ends in ``.proto`` is one proto file rather than an
    archive (handy for local development).

    Raises:
        ProtoError: naming ``uri``: it cannot be fetched, is not a safe
            archive, or does not compile.
    """
    try:
        content = await fetch.load(uri)
    except ProtoError:
        raise
    except Exception as exc:
        raise ProtoError(f"service_api_source {uri!r}: cannot fetch: {exc}") from None
    try:
        if uri.split("?", 1)[0].endswith(".proto"):
            files = {posixpath.basename(uri.split("?", 1)[0]): content}
        else:
            files = extract_proto_files(content)
        return ServiceProtos(await compile_descriptor_set(files, reactor))
    except ProtoError as exc:
        raise ProtoError(f"service_api_source {uri!r}: {exc}") from None


# --------------------------------------------------------------------------
# Calls to JSON services (jsonrpc, http).


def client_sends_json(call: ServerCall, encoding: str) -> bool:
    """Whether the call's messages are JSON text rather than protobuf.

    They are when the content type says so (``application/grpc+json``,
    ``application/grpc-web+json``), and for every call to a service whose
    metadata says ``encoding: json``: its clients (snet-sdk, snet-cli, and
    grpcio clients with JSON serializers, which cannot set a content type)
    send JSON after reading the daemon's ``/encoding``.
    """
    return encoding == "json" or call.content_type.endswith("+json")


#: A protobuf identifier: what a method's short name is.
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: Longest method name quoted in an error (the client chose it).
_SHOWN_NAME: Final = 100


def short_name(path: str) -> str:
    """The short name of the method called as ``path`` (``Method`` of ``/package.Service/Method``).

    Services are told the short name: as an executable's argument, in an
    HTTP service's URL.  Without protos nothing has checked it, and the
    client could pick ``--config=x`` (an option to the executable) or
    ``..``, ``Echo?admin=1``, ``%2F`` (another URL); so it must be a
    protobuf identifier, as every method defined in a ``.proto`` is.

    Raises:
        GrpcError: ``UNIMPLEMENTED`` when it is not a protobuf identifier
            (no such method can exist).
    """
    name = path.rsplit("/", 1)[-1]
    if _IDENTIFIER.fullmatch(name) is None:
        shown = name if len(name) <= _SHOWN_NAME else name[:_SHOWN_NAME] + "..."
        raise GrpcError(Status.UNIMPLEMENTED, f"method name {shown!r} is not a protobuf identifier")
    return name


def request_text(value: Any) -> bytes:
    """A client's JSON request value as the text sent to the service.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` when it holds a lone surrogate
            (``"\\ud800"`` is valid JSON but no text: it cannot be sent).
    """
    try:
        return jsontext.dumps(value)
    except ValueError as exc:
        raise GrpcError(Status.INVALID_ARGUMENT, f"request message: {exc}") from None


class JsonMessages:
    """Turns one call's messages into JSON values for the service, and back.

    JSON from the client passes through unchanged (only checked to be
    JSON), as in the Go daemon; protobuf from the client is converted with
    the method's descriptors, which the Go daemon cannot do for JSON-RPC.

    Args:
        method: the method's descriptors, or None when the protos are unknown.
        client_json: the client's messages are JSON text.
    """

    __slots__ = ("client_json", "method")

    def __init__(self, method: MethodInfo | None, client_json: bool) -> None:
        self.method = method
        self.client_json = client_json

    @classmethod
    def for_call(cls, call: ServerCall, protos: ServiceProtos | None, encoding: str) -> JsonMessages:
        """The converter for ``call``.

        Raises:
            GrpcError: ``UNIMPLEMENTED`` when the protos are known and do not
                define the method, or when they are unknown and the client
                sends protobuf (which cannot be converted without them).
        """
        client_json = client_sends_json(call, encoding)
        if protos is not None:
            return cls(protos.require(call.method), client_json)
        if not client_json:
            raise GrpcError(
                Status.UNIMPLEMENTED,
                "this service has no service_api_source: the daemon cannot convert protobuf "
                "messages to JSON; send JSON messages (application/grpc+json)",
            )
        return cls(None, client_json)

    def request(self, data: bytes) -> Any:
        """A request message as the JSON value sent to the service.

        Raises:
            GrpcError: ``INVALID_ARGUMENT`` for a malformed message.
        """
        if self.client_json:
            try:
                return jsontext.loads(data)
            except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                raise GrpcError(Status.INVALID_ARGUMENT, f"request message is not JSON: {exc}") from None
        assert self.method is not None
        return self.method.request_to_json(data)

    def reply(self, value: Any) -> bytes:
        """A JSON value from the service as a reply message for the client.

        Raises:
            GrpcError: ``INTERNAL`` when it does not fit the reply type.
        """
        if self.client_json:
            # Lone surrogates replaced: the service's text is passed on, never refused.
            return jsontext.dumps(value, replace=True)
        assert self.method is not None
        return self.method.reply_from_json(value)


#: Sends one request value to the service and hands each answer to ``emit``.
#: ``many`` says whether an answer that is a JSON array is a stream of
#: replies (server-streaming methods) rather than one reply.
Exchange = Callable[[Any, Callable[[Any], Awaitable[None]], bool], Awaitable[None]]


async def relay_json(call: ServerCall, messages: JsonMessages, exchange: Exchange, max_gathered: int) -> None:
    """Serve ``call`` with request/answer exchanges, by call kind.

    * unary and server-streaming: the one request message is one exchange;
      a server-streaming answer may hold several replies;
    * client-streaming: every request message, in order, in one JSON array:
      one exchange, one reply;
    * bidirectional, and any call whose kind is unknown (no protos): each
      request message is one exchange, its answers are sent before the next
      message is read.

    Args:
        call: the call.
        messages: its converter.
        exchange: talks to the service.
        max_gathered: most request bytes gathered for a client-streaming
            exchange.

    Raises:
        GrpcError: ``INVALID_ARGUMENT`` when a unary or server-streaming call
            does not carry exactly one request message, or
            ``RESOURCE_EXHAUSTED`` when a client stream is over
            ``max_gathered``; whatever ``exchange`` raises.
    """
    method = messages.method

    async def emit(value: Any) -> None:
        call.write(messages.reply(value))
        await call.drain()

    if method is None or (method.client_streaming and method.server_streaming):
        streaming = method is not None
        while (data := await call.read()) is not None:
            await exchange(messages.request(data), emit, streaming)
        return
    if method.client_streaming:
        gathered: list[Any] = []
        size = 0
        while (data := await call.read()) is not None:
            size += len(data)
            if size > max_gathered:
                raise GrpcError(Status.RESOURCE_EXHAUSTED, f"client stream is larger than {max_gathered} bytes")
            gathered.append(messages.request(data))
        await exchange(gathered, emit, False)
        return
    data = call.request_if_complete()
    if data is None:
        data = await call.read()
        if data is None or await call.read() is not None:
            raise GrpcError(Status.INVALID_ARGUMENT, f"{method.path} takes exactly one request message")
    await exchange(messages.request(data), emit, method.server_streaming)
