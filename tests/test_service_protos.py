"""The service's protos: archive safety, compilation, method lookup and JSON conversion."""

from __future__ import annotations

import asyncio
import io
import tarfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf import descriptor_pool

from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.upstream import protos as protos_module
from snet_daemon.upstream.protos import (
    JsonMessages,
    ProtoError,
    ServiceProtos,
    api_source_uri,
    compile_descriptor_set,
    extract_proto_files,
    load_protos,
)
from tests.support.aio import aio_test
from tests.support.services import (
    UNPRINTABLE_TIME,
    LocalFetcher,
    demo_files,
    demo_protos,
    demo_tarball,
    make_tarball,
    new_call,
    pids_alive,
    request_bytes,
    wait_for,
)


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        tar.addfile(member, io.BytesIO(data) if data else None)
    return out.getvalue()


# --------------------------------------------------------------------------
# Archives.


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz", ""])
def test_archives_in_every_tar_format_are_read(compression: str) -> None:
    """tar, tar.gz, tar.bz2 and tar.xz archives all yield their .proto files."""
    files = extract_proto_files(make_tarball(demo_files(), compression))
    assert files == demo_files()


def test_directories_dot_prefixes_and_other_files_are_handled() -> None:
    """'./' prefixes are dropped, sub-directories kept, non-.proto files skipped."""
    archive = make_tarball({"./a.proto": b"x", "sub/b.proto": b"y", "README.md": b"z"})
    assert extract_proto_files(archive) == {"a.proto": b"x", "sub/b.proto": b"y"}


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("/etc/evil.proto", "absolute"),
        ("../evil.proto", "'..'"),
        ("a/../../evil.proto", "'..'"),
        # protoc would take these for an option and an argument file.
        ("--dependency_out=escaped.proto", "may not start with '-' or '@'"),
        ("@args.proto", "may not start with '-' or '@'"),
        ("./--x.proto", "may not start with '-' or '@'"),
    ],
)
def test_unsafe_member_names_are_refused(name: str, reason: str) -> None:
    """Absolute paths and '..' components are refused, naming the member."""
    with pytest.raises(ProtoError, match=reason) as caught:
        extract_proto_files(make_tarball({name: b"x"}))
    assert name in str(caught.value)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE, tarfile.CHRTYPE])
def test_links_and_devices_are_refused(kind: bytes) -> None:
    """Symbolic links, hard links, FIFOs and devices are refused."""
    member = tarfile.TarInfo("link.proto")
    member.type = kind
    member.linkname = "/etc/passwd"
    with pytest.raises(ProtoError, match="only regular files"):
        extract_proto_files(_tar_with(member))


def test_oversized_members_are_refused_before_reading() -> None:
    """A member over the size limit is refused (a decompression bomb stops there)."""
    archive = make_tarball({"big.proto": b"\0" * (protos_module.MAX_FILE_SIZE + 1)})
    with pytest.raises(ProtoError, match="limit"):
        extract_proto_files(archive)


def test_too_many_members_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """An archive with more members than allowed is refused."""
    monkeypatch.setattr(protos_module, "MAX_ARCHIVE_FILES", 3)
    archive = make_tarball({f"f{i}.proto": b"x" for i in range(4)})
    with pytest.raises(ProtoError, match="more than 3 members"):
        extract_proto_files(archive)


def test_total_size_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sum of the members' sizes is bounded too."""
    monkeypatch.setattr(protos_module, "MAX_TOTAL_SIZE", 10)
    with pytest.raises(ProtoError, match="larger than 10 bytes"):
        extract_proto_files(make_tarball({"a.proto": b"x" * 6, "b.proto": b"y" * 6}))


def test_not_a_tar_and_no_proto_are_clear_errors() -> None:
    """Random bytes and archives without .proto files say so."""
    with pytest.raises(ProtoError, match="not a tar archive"):
        extract_proto_files(b"this is not an archive" * 40)
    with pytest.raises(ProtoError, match=r"no \.proto file"):
        extract_proto_files(make_tarball({"README": b"hello"}))


def test_api_source_prefers_service_api_source_then_legacy_hash() -> None:
    """service_api_source wins; a bare model_ipfs_hash CID becomes ipfs://."""
    assert api_source_uri("ipfs://QmA", "QmB") == "ipfs://QmA"
    assert api_source_uri("", "QmB") == "ipfs://QmB"
    assert api_source_uri("  ", "") == ""


# --------------------------------------------------------------------------
# Compilation.


@aio_test
async def test_demo_protos_compile_with_imports_and_well_known_types(tmp_path: Path) -> None:
    """Two files importing each other and google/protobuf/timestamp.proto compile into a set."""
    protos = await load_protos(str(demo_tarball(tmp_path)), LocalFetcher(), _reactor())
    assert "google/protobuf/timestamp.proto" in protos.files
    kinds = {m.name: (m.client_streaming, m.server_streaming) for m in protos}
    assert kinds["Echo"] == (False, False)
    assert kinds["Split"] == (False, True)
    assert kinds["Join"] == (True, False)
    assert kinds["Chat"] == (True, True)
    echo = protos.require("/demo.Demo/Echo")
    assert echo.input_type.DESCRIPTOR.full_name == "demo.Request"
    assert echo.output_type.DESCRIPTOR.full_name == "demo.Reply"


@aio_test
async def test_protos_live_in_a_private_pool() -> None:
    """A service may define the daemon's own message names: nothing clashes with the default pool."""
    clash = b'syntax = "proto3"; package escrow; message ChannelStateRequest { string mine = 1; }\n'
    clash += b"service PaymentChannelStateService { rpc GetChannelState(ChannelStateRequest) "
    clash += b"returns (ChannelStateRequest); }\n"
    protos = ServiceProtos(await compile_descriptor_set({"state.proto": clash}, _reactor()))
    method = protos.require("/escrow.PaymentChannelStateService/GetChannelState")
    assert "mine" in method.input_type.DESCRIPTOR.fields_by_name
    with pytest.raises(KeyError):
        descriptor_pool.Default().FindMessageTypeByName("demo.Request")


@aio_test
async def test_a_proto_that_does_not_compile_reports_protoc_diagnostics() -> None:
    """protoc's message, with the file and line, is in the error."""
    broken = {"demo.proto": b'syntax = "proto3";\nmessage A { strin x = 1; }\n'}
    with pytest.raises(ProtoError, match=r"do not compile:\ndemo\.proto:2"):
        await compile_descriptor_set(broken, _reactor())


def _fake_python(directory: Path, body: str) -> str:
    """A stand-in for the interpreter that runs ``protoc``: a shell script that records its pid in
    ``directory/pid``, then runs ``body``."""
    script = directory / "python"
    script.write_text(f"#!/bin/sh\necho $$ > {directory / 'pid'}\n{body}\n")
    script.chmod(0o755)
    return str(script)


@aio_test
async def test_an_interpreter_without_grpcio_tools_is_named_as_the_cause(tmp_path: Path) -> None:
    """Python's own words for a missing module get the operator a plain answer, not protoc's."""
    python = _fake_python(
        tmp_path,
        "echo \"python: Error while finding module specification for 'grpc_tools.protoc' "
        "(ModuleNotFoundError: No module named 'grpc_tools')\" >&2; exit 1",
    )
    with pytest.raises(ProtoError, match="needs grpcio-tools, which is not installed"):
        await compile_descriptor_set(demo_files(), _reactor(), python=python)


def _has_pid(pidfile: Path) -> bool:
    return pidfile.exists() and bool(pidfile.read_text().strip())


@aio_test
async def test_protoc_is_killed_when_given_up_on(tmp_path: Path) -> None:
    """A protoc past its time limit, or whose caller is cancelled, is killed (it was left
    running: only the wait for it ended)."""
    python = _fake_python(tmp_path, "exec sleep 30")
    pidfile = tmp_path / "pid"
    with pytest.raises(ProtoError, match=r"did not finish in 0\.3s"):
        await compile_descriptor_set(demo_files(), _reactor(), python=python, time_limit=0.3)
    assert wait_for(lambda: not pids_alive(pidfile), 2.0)
    pidfile.unlink()
    task = asyncio.ensure_future(compile_descriptor_set(demo_files(), _reactor(), python=python))
    for _ in range(200):
        if _has_pid(pidfile):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wait_for(lambda: not pids_alive(pidfile), 2.0)


@aio_test
async def test_protoc_output_is_kept_bounded(tmp_path: Path) -> None:
    """Only the start of what protoc prints is held (it was all read into memory), and its
    diagnostics are still quoted, shortened."""
    python = _fake_python(tmp_path, "head -c 1000000 /dev/zero | tr '\\0' x >&2\nexit 1")
    spawned: list[Any] = []
    reactor = _reactor()

    def spawn(protocol: Any, *args: Any, **kwargs: Any) -> Any:
        spawned.append(protocol)
        return reactor.spawnProcess(protocol, *args, **kwargs)

    with pytest.raises(ProtoError, match=r"do not compile:\nx{2000}\.\.\.$"):
        await compile_descriptor_set(demo_files(), SimpleNamespace(spawnProcess=spawn), python=python)  # type: ignore[arg-type]
    stdout, stderr = spawned[0].output
    assert (len(stdout), len(stderr)) == (0, protos_module._OUTPUT_LIMIT)


@aio_test
async def test_a_missing_import_is_a_compile_error(tmp_path: Path) -> None:
    """An archive lacking an imported file fails to compile, naming the URI."""
    files = demo_files()
    del files["common.proto"]
    path = tmp_path / "partial.tar.gz"
    path.write_bytes(make_tarball(files))
    with pytest.raises(ProtoError, match=r"common\.proto") as caught:
        await load_protos(str(path), LocalFetcher(), _reactor())
    assert str(path) in str(caught.value)


@aio_test
async def test_a_single_proto_file_uri_needs_no_archive(tmp_path: Path) -> None:
    """A URI ending in .proto is compiled as one file."""
    path = tmp_path / "one.proto"
    path.write_bytes(b'syntax = "proto3"; package one; message M {} service S { rpc Do(M) returns (M); }\n')
    protos = await load_protos(str(path), LocalFetcher(), _reactor())
    assert list(protos.methods) == ["/one.S/Do"]


@aio_test
async def test_fetch_failures_name_the_uri() -> None:
    """A source that cannot be fetched is a ProtoError naming it."""
    with pytest.raises(ProtoError, match=r"ipfs://QmMissing.*cannot fetch"):
        await load_protos("ipfs://QmMissing", LocalFetcher(), _reactor())


# --------------------------------------------------------------------------
# Conversion.


def test_requests_become_json_with_original_field_names() -> None:
    """proto -> JSON uses the .proto field names, base64 bytes and string int64 (as Go's protojson)."""
    method = demo_protos().require("/demo.Demo/Echo")
    value = method.request_to_json(request_bytes(text="hi", count=7, blob=b"\x00\xff", sent_at={"seconds": 1}))
    assert value == {"text": "hi", "count": "7", "blob": "AP8=", "sent_at": "1970-01-01T00:00:01Z"}
    assert method.request_from_json(value) == request_bytes(
        text="hi", count=7, blob=b"\x00\xff", sent_at={"seconds": 1}
    )


def test_answers_ignore_unknown_fields_but_not_wrong_types() -> None:
    """Unknown answer fields are dropped; an answer of the wrong shape is INTERNAL."""
    method = demo_protos().require("/demo.Demo/Echo")
    reply: Any = method.output_type()
    reply.ParseFromString(method.reply_from_json({"text": "ok", "surprise": 1}))
    assert reply.text == "ok"
    with pytest.raises(GrpcError) as caught:
        method.reply_from_json({"count": "not a number"})
    assert caught.value.status == Status.INTERNAL


def test_bad_client_messages_are_invalid_argument() -> None:
    """Undecodable protobuf and unknown JSON request fields are the client's error."""
    method = demo_protos().require("/demo.Demo/Echo")
    for bad in (lambda: method.request_to_json(b"\xff\xff\xff"), lambda: method.request_from_json({"nope": 1})):
        with pytest.raises(GrpcError) as caught:
            bad()
        assert caught.value.status == Status.INVALID_ARGUMENT


def test_messages_without_a_json_form_are_clean_errors() -> None:
    """A message that parses but has no JSON form is the client's error in a request and the
    service's in a reply, both with a message (they were unexpected errors: "internal error")."""
    method = demo_protos().require("/demo.Demo/Echo")
    with pytest.raises(GrpcError, match=r"request is not a valid demo\.Request: .*sent_at") as caught:
        method.request_to_json(request_bytes(sent_at=UNPRINTABLE_TIME))
    assert caught.value.status == Status.INVALID_ARGUMENT
    reply = method.output_type(sent_at=UNPRINTABLE_TIME).SerializeToString()
    with pytest.raises(GrpcError, match=r"service answer is not a valid demo\.Reply: .*sent_at") as caught:
        method.reply_to_json(reply)
    assert caught.value.status == Status.INTERNAL


@aio_test
async def test_message_format_follows_content_type_and_encoding() -> None:
    """+json content types and encoding json mean JSON messages; unknown methods are UNIMPLEMENTED."""
    protos = demo_protos()
    call, _ = new_call("/demo.Demo/Echo")
    assert not JsonMessages.for_call(call, protos, "proto").client_json
    assert JsonMessages.for_call(call, protos, "json").client_json
    call.content_type = "application/grpc-web+json"
    assert JsonMessages.for_call(call, protos, "proto").client_json
    missing, _ = new_call("/demo.Demo/Missing")
    with pytest.raises(GrpcError) as caught:
        JsonMessages.for_call(missing, protos, "json")
    assert caught.value.status == Status.UNIMPLEMENTED
    proto_call, _ = new_call("/demo.Demo/Echo")
    with pytest.raises(GrpcError, match="service_api_source") as caught:
        JsonMessages.for_call(proto_call, None, "proto")
    assert caught.value.status == Status.UNIMPLEMENTED


def test_answers_must_be_objects_and_null_is_the_empty_message() -> None:
    """null (a void JSON-RPC result) is the empty reply; a list or a string is not a message."""
    method = demo_protos().require("/demo.Demo/Echo")
    assert method.reply_from_json(None) == b""
    for bad in ([1, 2], "text", 5):
        with pytest.raises(GrpcError, match="expected a JSON object") as caught:
            method.reply_from_json(bad)
        assert caught.value.status == Status.INTERNAL


def test_archive_declaring_a_huge_header_is_refused_without_inflating_it() -> None:
    """A small .tar.gz whose GNU long-name header declares 200 MB (tarfile reads such headers
    whole, before any member limit applies) is refused once the content passes the limit."""
    import tracemalloc
    import zlib

    info = tarfile.TarInfo("././@LongLink")
    info.type = tarfile.GNUTYPE_LONGNAME
    info.size = 200 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    archive = compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT))
    zeros = bytes(1 << 20)
    for _ in range(200):
        archive += compressor.compress(zeros)
    archive += compressor.flush()
    assert len(archive) < 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ProtoError, match="larger than"):
            extract_proto_files(archive)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 100 << 20
