"""``service_type: process`` with real executables (Python and shell), without a daemon."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from twisted.logger import globalLogPublisher

from snet_daemon.frontend.call import start_call
from snet_daemon.frontend.status import Status
from snet_daemon.payments.gate import PaymentGate
from snet_daemon.upstream import process as process_module
from snet_daemon.upstream.process import ProcessLimiter, ProcessUpstream, child_environment, find_executable
from snet_daemon.upstream.protos import ServiceProtos
from tests.support.aio import aio_test, wait_for
from tests.support.payments import RecordingLedger
from tests.support.services import (
    SHELL_EXECUTABLE,
    UNPRINTABLE_TIME,
    demo_protos,
    invoke,
    json_bytes,
    new_call,
    parse_reply,
    pids_alive,
    python_executable,
    request_bytes,
)

MIB = 1024 * 1024


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _adapter(
    executable: str,
    *,
    encoding: str = "proto",
    protos: ServiceProtos | None = None,
    limit: int = 4,
    environ: dict[str, str] | None = None,
    max_message_size: int = 64 * MIB,
    use_protos: bool = True,
) -> ProcessUpstream:
    return ProcessUpstream(
        _reactor(),
        executable,
        protos=(protos or demo_protos()) if use_protos else None,
        encoding=encoding,
        limiter=ProcessLimiter(limit),
        environ=environ if environ is not None else dict(os.environ),
        max_message_size=max_message_size,
    )


_FRAME_HEADER = 5


def _frame(message: bytes) -> bytes:
    """``message`` framed as on a streaming proto pipe."""
    return b"\0" + len(message).to_bytes(4, "big") + message


def _replying(directory: Path, output: bytes) -> str:
    """An executable that reads all its input, then writes ``output`` and exits 0."""
    payload = directory / "output.bin"
    payload.write_bytes(output)
    exe = directory / "replying.sh"
    exe.write_text(f"#!/bin/sh\ncat >/dev/null\ncat {payload}\n")
    exe.chmod(0o755)
    return str(exe)


def _unprintable_reply() -> bytes:
    """A demo.Reply that parses but has no JSON form (its Timestamp's nanos are over 10^9)."""
    reply = demo_protos().require("/demo.Demo/Split").output_type(text="late", sent_at=UNPRINTABLE_TIME)
    return reply.SerializeToString()


#: Escrow payment metadata (any values do: the tests' ledger accepts everything).
ESCROW_PAYMENT = (
    ("snet-payment-channel-id", "1"),
    ("snet-payment-channel-nonce", "0"),
    ("snet-payment-channel-amount", "10"),
    ("snet-payment-channel-signature-bin", b"x" * 65),
)


@pytest.fixture
def python(tmp_path: Path) -> str:
    """The Python demo executable."""
    return python_executable(tmp_path)


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[process_module._Child]:
    """The runs the adapters start from now on, in order."""
    started: list[process_module._Child] = []

    class Recorded(process_module._Child):
        def connectionMade(self) -> None:
            started.append(self)
            super().connectionMade()

    monkeypatch.setattr(process_module, "_Child", Recorded)
    return started


@contextmanager
def captured() -> Iterator[list[dict[str, Any]]]:
    """Log events emitted while the block runs."""
    events: list[dict[str, Any]] = []
    observer: Any = events.append
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def _texts(events: list[dict[str, Any]]) -> list[str]:
    from twisted.logger import formatEvent

    return [formatEvent(event) for event in events if event.get("log_namespace") == "snetd.upstream.process"]


# --------------------------------------------------------------------------
# Unit pieces.


def test_executables_are_resolved_and_checked(tmp_path: Path) -> None:
    """executable_path must name an executable file; bare names are looked up on PATH."""
    assert find_executable("sh").startswith("/")
    assert find_executable(SHELL_EXECUTABLE) == SHELL_EXECUTABLE
    plain = tmp_path / "plain.sh"
    plain.write_text("echo hi\n")
    for bad in ("", str(plain), str(tmp_path), "/no/such/program"):
        with pytest.raises(ValueError, match="executable"):
            find_executable(bad)


def test_the_daemons_settings_never_reach_the_executable() -> None:
    """SNET_* variables (configuration, keys) are dropped from the child's environment."""
    env = child_environment({"PATH": "/bin", "SNET_PRIVATE_KEY_FOR_METERING": "k", "snet_x": "y", "HOME": "/h"})
    assert env == {"PATH": "/bin", "HOME": "/h"}


@aio_test
async def test_the_limiter_queues_in_order_and_forgets_cancelled_waiters() -> None:
    """Slots are handed out first come, first served; a cancelled waiter gives up its place."""
    limiter = ProcessLimiter(1)
    await limiter.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await limiter.acquire()
        order.append(name)

    first, gone, last = (asyncio.ensure_future(take(n)) for n in ("first", "gone", "last"))
    await asyncio.sleep(0)
    assert limiter.waiting == 3
    gone.cancel()
    limiter.release()
    await asyncio.sleep(0)
    limiter.release()
    await asyncio.gather(first, last)
    assert order == ["first", "last"]
    assert (limiter.running, limiter.waiting) == (1, 0)


# --------------------------------------------------------------------------
# Unary calls.


@aio_test
async def test_python_executable_echoes_protobuf(python: str) -> None:
    """The request bytes go to stdin, stdout is the reply, the method name is the argument."""
    sink = await invoke(_adapter(python), "/demo.Demo/Echo", [request_bytes(text="hi", count=-5, blob=b"\0\1")])
    assert sink.status == Status.OK, sink.message
    reply = parse_reply(sink.messages[0])
    assert (reply.text, reply.count, reply.blob) == ("hi", -5, b"\0\1")


@aio_test
async def test_shell_executable_echoes_protobuf() -> None:
    """`cat` as a service: the request is the reply (Go's contract, with stderr kept apart)."""
    sink = await invoke(_adapter(SHELL_EXECUTABLE), "/demo.Demo/Echo", [request_bytes(text="sh")])
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).text == "sh"


@aio_test
async def test_json_encoding_passes_json_text(python: str) -> None:
    """encoding json: stdin and stdout are JSON text."""
    sink = await invoke(_adapter(python, encoding="json"), "/demo.Demo/Echo", [json_bytes({"text": "j", "count": "4"})])
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0]) == {"text": "j", "count": "4"}


@aio_test
async def test_json_clients_of_a_proto_executable_are_converted(python: str) -> None:
    """A +json client of a proto service: the daemon converts the request and the reply."""
    sink = await invoke(
        _adapter(python),
        "/demo.Demo/Echo",
        [json_bytes({"text": "conv", "count": "9"})],
        content_type="application/grpc-web+json",
    )
    assert sink.status == Status.OK, sink.message
    assert json.loads(sink.messages[0]) == {"text": "conv", "count": "9"}


@aio_test
async def test_env_tells_the_executable_what_it_gets(tmp_path: Path) -> None:
    """SNETD_METHOD, SNETD_ENCODING and SNETD_STREAMING are set; SNET_* is not passed."""
    script = tmp_path / "env.sh"
    script.write_text("#!/bin/sh\nenv | sort\n")
    script.chmod(0o755)
    environ = {"PATH": os.environ["PATH"], "SNET_SERVICE_ENDPOINT": "secret", "KEEP": "me"}
    sink = await invoke(_adapter(str(script), environ=environ), "/demo.Demo/Split", [request_bytes()])
    assert sink.status == Status.INTERNAL  # env output is no frame: the stream ends mid-frame
    sink = await invoke(_adapter(str(script), environ=environ), "/demo.Demo/Echo", [request_bytes()])
    assert sink.status == Status.OK, sink.message
    lines = sink.messages[0].decode().splitlines()
    assert "SNETD_METHOD=/demo.Demo/Echo" in lines
    assert "SNETD_ENCODING=proto" in lines
    assert "SNETD_STREAMING=none" in lines
    assert "KEEP=me" in lines
    assert not [line for line in lines if line.startswith("SNET_")]


@pytest.mark.parametrize(("which", "status"), [("python", 9), ("shell", 7)])
@aio_test
async def test_failures_are_internal_and_stderr_goes_to_the_log(python: str, which: str, status: int) -> None:
    """A non-zero exit is INTERNAL with the status; stderr is logged, never sent to the client."""
    executable = python if which == "python" else SHELL_EXECUTABLE
    with captured() as events:
        sink = await invoke(
            _adapter(executable), "/demo.Demo/Fail", [request_bytes(options={"fail_code": 9, "fail_message": "oops"})]
        )
    assert sink.status == Status.INTERNAL
    assert sink.message == f"the executable exited with status {status}"
    assert sink.messages == []
    assert any("failing on purpose" in text and "stderr" in text for text in _texts(events))


@aio_test
async def test_a_lot_of_stderr_is_logged_bounded_and_kept_out_of_the_reply(python: str) -> None:
    """1 MB of stderr neither blocks the executable nor reaches the reply; the log is bounded."""
    with captured() as events:
        sink = await invoke(_adapter(python), "/demo.Demo/Noisy", [request_bytes(text="quiet")])
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).text == "quiet"
    texts = _texts(events)
    noise = [text for text in texts if "noise line" in text]
    assert 0 < len(noise) < 2000
    assert any("more bytes of stderr not logged" in text for text in texts)


# --------------------------------------------------------------------------
# Large inputs and outputs.


@pytest.mark.parametrize("which", ["python", "shell"])
@aio_test
async def test_twenty_megabytes_in_and_out_do_not_deadlock(python: str, which: str) -> None:
    """20 MB through stdin and back through stdout completes."""
    executable = python if which == "python" else SHELL_EXECUTABLE
    blob = os.urandom(20 * MIB)
    sink = await invoke(_adapter(executable), "/demo.Demo/Echo", [request_bytes(blob=blob)], timeout=60)
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).blob == blob


@pytest.mark.parametrize("which", ["python", "shell"])
@aio_test
async def test_an_executable_that_never_reads_stdin_still_answers(python: str, which: str) -> None:
    """A 20 MB request to an executable that ignores stdin: its answer is used, nothing hangs."""
    executable = python if which == "python" else SHELL_EXECUTABLE
    start = time.monotonic()
    sink = await invoke(_adapter(executable), "/demo.Demo/NoRead", [request_bytes(blob=b"x" * 20 * MIB)], timeout=30)
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).text == ("no-read" if which == "python" else "")
    assert time.monotonic() - start < 10


@aio_test
async def test_big_output_while_input_is_still_being_written(python: str) -> None:
    """A 20 MB reply and a 20 MB request at once (the Go daemon's deadlock, #169)."""
    request = request_bytes(blob=b"i" * 20 * MIB, options={"reply_size": 20 * MIB})
    sink = await invoke(_adapter(python), "/demo.Demo/Echo", [request], timeout=60)
    assert sink.status == Status.OK, sink.message
    assert parse_reply(sink.messages[0]).blob == b"r" * 20 * MIB


@aio_test
async def test_output_over_the_message_limit_is_refused(python: str) -> None:
    """stdout beyond max_message_size is RESOURCE_EXHAUSTED and the process is killed."""
    sink = await invoke(
        _adapter(python, max_message_size=1024), "/demo.Demo/Echo", [request_bytes(options={"reply_size": 4096})]
    )
    assert sink.status == Status.RESOURCE_EXHAUSTED


# --------------------------------------------------------------------------
# Deadlines, cancellation, concurrency.


@pytest.mark.parametrize("which", ["python", "shell"])
@aio_test
async def test_the_deadline_kills_the_process_group(python: str, which: str, tmp_path: Path) -> None:
    """A hanging executable and its child are killed at the deadline: DEADLINE_EXCEEDED."""
    pidfile = tmp_path / "pids"
    executable = python if which == "python" else SHELL_EXECUTABLE
    adapter = _adapter(executable, environ={**os.environ, "DEMO_PIDFILE": str(pidfile)})
    start = time.monotonic()
    sink = await invoke(adapter, "/demo.Demo/Hang", [request_bytes()], timeout=1.0)
    assert sink.status == Status.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    for _ in range(100):
        if pidfile.exists() and len(pidfile.read_text().split()) == 2 and not pids_alive(pidfile):
            break
        await asyncio.sleep(0.05)
    assert len(pidfile.read_text().split()) == 2
    assert pids_alive(pidfile) == []
    for _ in range(100):
        if adapter.limiter.running == 0:
            break
        await asyncio.sleep(0.05)
    assert adapter.limiter.running == 0


@aio_test
async def test_client_cancellation_kills_the_process(python: str, tmp_path: Path) -> None:
    """A client that goes away takes the executable (and its children) with it."""
    pidfile = tmp_path / "pids"
    adapter = _adapter(python, environ={**os.environ, "DEMO_PIDFILE": str(pidfile)})
    call, sink = new_call("/demo.Demo/Hang")
    call.deliver(request_bytes())
    call.end_input()
    start_call(adapter, call)
    for _ in range(200):
        if pidfile.exists() and len(pidfile.read_text().split()) == 2:
            break
        await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(100):
        if not pids_alive(pidfile):
            break
        await asyncio.sleep(0.05)
    assert pids_alive(pidfile) == []
    assert sink.status is None  # nothing is sent to a client that left


@aio_test
async def test_the_process_group_is_killed_until_the_executable_is_reaped_and_never_after(
    python: str, tmp_path: Path, children: list[process_module._Child], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call ending while its executable runs kills its group; one ending after the executable
    was reaped (a slow client still holding replies in the pipe) sends no signal to the group's
    id, which may by then be another group's (it killed it: one group per call, pids wrap)."""
    killed: list[int] = []
    killpg = os.killpg

    def recording(pgid: int, sig: int) -> None:
        killed.append(pgid)
        if any(child.pid == pgid and child.transport and child.transport.pid for child in children):
            killpg(pgid, sig)  # the executable is not reaped: the group is its own

    monkeypatch.setattr(os, "killpg", recording)  # as the adapter calls it
    pidfile = tmp_path / "pids"
    hanging, _ = new_call("/demo.Demo/Hang")
    hanging.deliver(request_bytes())
    hanging.end_input()
    start_call(_adapter(python, environ={**os.environ, "DEMO_PIDFILE": str(pidfile)}), hanging)
    await wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2)
    hanging.cancel()
    await wait_for(lambda: children[0].exited)
    assert killed[0] == children[0].pid
    await wait_for(lambda: not pids_alive(pidfile))  # the executable's child too

    killed.clear()
    out_type = demo_protos().require("/demo.Demo/Split").output_type
    frames = b"".join(_frame(out_type(text="x" * 10_000, index=index).SerializeToString()) for index in range(4))
    (tmp_path / "replying").mkdir()
    streaming, sink = new_call("/demo.Demo/Split")
    sink.writable = False  # the replies wait in the pipe after the exit
    streaming.deliver(request_bytes(text="go"))
    streaming.end_input()
    start_call(_adapter(_replying(tmp_path / "replying", frames)), streaming)
    await wait_for(lambda: len(children) == 2 and children[1].exited)
    assert killed == [children[1].pid]  # as it was reaped, for what it left in its group
    streaming.cancel()
    assert streaming.task is not None
    await asyncio.wait([streaming.task], timeout=2)
    assert children[1].ended.done()
    assert killed == [children[1].pid]


@aio_test
async def test_running_processes_are_limited_and_the_rest_wait(python: str) -> None:
    """With a limit of 2, five slow calls run two at a time and all succeed."""
    adapter = _adapter(python, limit=2)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, adapter.limiter.running)
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    start = time.monotonic()
    sinks = await asyncio.gather(
        *(invoke(adapter, "/demo.Demo/Slow", [request_bytes(text=str(i), options={"delay_ms": 300})]) for i in range(5))
    )
    elapsed = time.monotonic() - start
    watcher.cancel()
    assert [parse_reply(s.messages[0]).text for s in sinks] == [str(i) for i in range(5)]
    assert peak == 2
    assert elapsed >= 0.85  # three rounds of 0.3 s


@aio_test
async def test_a_queued_call_still_has_its_deadline(python: str) -> None:
    """A call waiting for a slot ends at its deadline without running anything."""
    adapter = _adapter(python, limit=1)
    blocker = asyncio.ensure_future(invoke(adapter, "/demo.Demo/Slow", [request_bytes(options={"delay_ms": 1500})]))
    await asyncio.sleep(0.2)
    waiting = await invoke(adapter, "/demo.Demo/Echo", [request_bytes()], timeout=0.3)
    assert waiting.status == Status.DEADLINE_EXCEEDED
    assert (await blocker).status == Status.OK
    assert adapter.limiter.waiting == 0


# --------------------------------------------------------------------------
# Streaming.


@aio_test
async def test_server_streaming_reads_frames_from_stdout(python: str) -> None:
    """A server-streaming method's stdout is gRPC frames: one reply each."""
    sink = await invoke(_adapter(python), "/demo.Demo/Split", [request_bytes(text="to be or not")])
    assert sink.status == Status.OK, sink.message
    assert [(parse_reply(m).text, parse_reply(m).index) for m in sink.messages] == [
        ("to", 0),
        ("be", 1),
        ("or", 2),
        ("not", 3),
    ]


@pytest.mark.parametrize("ending", [b"", b"  ", b"\n  \n"])
@aio_test
async def test_a_last_json_line_without_its_newline_is_the_last_reply(tmp_path: Path, ending: bytes) -> None:
    """JSON Lines output whose last line has no newline (``printf`` style) ends with that line as
    its last reply (it was INTERNAL "incomplete reply frame", after the replies before it); a
    blank end is no reply."""
    exe = _replying(tmp_path, b'{"text": "a"}\n{"text": "b"}' + ending)
    sink = await invoke(_adapter(exe, encoding="json"), "/demo.Demo/Split", [json_bytes({"text": "a b"})])
    assert sink.status == Status.OK, sink.message
    assert sink.messages == [b'{"text": "a"}', b'{"text": "b"}']


@aio_test
async def test_output_ending_in_an_incomplete_proto_frame_is_internal(tmp_path: Path) -> None:
    """A cut gRPC frame is no reply: the call is INTERNAL after the complete ones."""
    reply = demo_protos().require("/demo.Demo/Split").output_type(text="a").SerializeToString()
    exe = _replying(tmp_path, _frame(reply) + _frame(reply)[:-1])
    sink = await invoke(_adapter(exe), "/demo.Demo/Split", [request_bytes()])
    assert (sink.status, sink.messages) == (Status.INTERNAL, [reply])
    assert sink.message == "the executable's output ends with an incomplete reply frame"


@aio_test
async def test_client_streaming_writes_frames_to_stdin(python: str) -> None:
    """A client-streaming method's requests reach stdin as frames; stdout is the one reply."""
    sink = await invoke(_adapter(python), "/demo.Demo/Join", [request_bytes(text=t) for t in ("a", "b", "c")])
    assert sink.status == Status.OK, sink.message
    reply = parse_reply(sink.messages[0])
    assert (reply.text, reply.count) == ("a b c", 3)


@pytest.mark.parametrize("encoding", ["proto", "json"])
@aio_test
async def test_bidi_streaming_is_interactive(python: str, encoding: str) -> None:
    """One process serves a bidirectional call: each reply arrives before the next request is sent."""
    adapter = _adapter(python, encoding=encoding)

    def message(text: str) -> bytes:
        return json_bytes({"text": text}) if encoding == "json" else request_bytes(text=text)

    def text_of(data: bytes) -> str:
        return str(json.loads(data)["text"]) if encoding == "json" else parse_reply(data).text

    call, sink = new_call("/demo.Demo/Chat")
    start_call(adapter, call)
    for i, word in enumerate(("ping", "pong", "done")):
        call.deliver(message(word))
        for _ in range(200):
            if len(sink.messages) > i:
                break
            await asyncio.sleep(0.01)
        assert text_of(sink.messages[i]) == word.upper()
    call.end_input()
    assert call.task is not None
    await call.task
    assert sink.status == Status.OK, sink.message


@aio_test
async def test_without_protos_each_message_runs_the_executable() -> None:
    """Without protos the call kind is unknown: one run and one reply per request message."""
    adapter = _adapter(SHELL_EXECUTABLE, use_protos=False)
    sink = await invoke(adapter, "/any.Thing/Echo", [b"first", b"second"])
    assert sink.status == Status.OK, sink.message
    assert sink.messages == [b"first", b"second"]


@aio_test
async def test_unknown_methods_are_unimplemented(python: str) -> None:
    """A method outside the protos never starts the executable."""
    adapter = _adapter(python)
    sink = await invoke(adapter, "/demo.Demo/Missing", [request_bytes()])
    assert sink.status == Status.UNIMPLEMENTED
    assert adapter.limiter.running == 0


@aio_test
async def test_stream_paused_by_a_slow_client_ends_after_the_executable_exited(tmp_path: Path) -> None:
    """A server-streaming executable writes all its replies and exits while the client is not
    reading: once the client reads again, the replies left in the pipe are relayed and the call
    ends (reading was never resumed after the exit: the call hung until its deadline)."""
    out_type = demo_protos().require("/demo.Demo/Split").output_type
    frames = b"".join(_frame(out_type(text="x" * 10_000, index=index).SerializeToString()) for index in range(4))
    adapter = _adapter(_replying(tmp_path, frames), limit=2)
    call, sink = new_call("/demo.Demo/Split", timeout=5.0)
    sink.writable = False  # the client's transport buffer is full
    call.deliver(request_bytes(text="go"))
    call.end_input()
    start_call(adapter, call)
    await asyncio.sleep(1.0)  # the executable writes everything and exits
    sink.writable = True
    call.writable()
    assert call.task is not None
    await asyncio.wait_for(asyncio.shield(call.task), 3.0)
    assert sink.status == Status.OK, sink.message
    assert len(sink.messages) == 4
    assert adapter.limiter.running == 0


@aio_test
async def test_replies_left_in_the_pipe_are_read_when_the_grace_ends_as_the_client_reads_again(
    tmp_path: Path, children: list[process_module._Child]
) -> None:
    """The executable wrote its replies and exited while the client was not reading; the client
    reads again just as the exit grace ends: the replies left in the pipe are all relayed (the
    pipe was closed, its unread replies dropped, and the call ended OK, charged, without them)."""
    out_type = demo_protos().require("/demo.Demo/Split").output_type
    # Frames of 8 KiB, as much as one read of the pipe: each read is one whole reply.
    size = 8192 - _FRAME_HEADER - len(out_type(text="", index=1).SerializeToString()) - 3  # text's tag and length
    replies = [out_type(text="x" * size, index=index).SerializeToString() for index in range(1, 7)]
    assert {len(_frame(reply)) for reply in replies} == {8192}
    adapter = _adapter(_replying(tmp_path, b"".join(_frame(reply) for reply in replies)), limit=2)
    call, sink = new_call("/demo.Demo/Split", timeout=8.0)
    sink.writable = False  # the client's transport buffer is full
    call.deliver(request_bytes(text="go"))
    call.end_input()
    start_call(adapter, call)
    await wait_for(lambda: bool(children) and children[0].exited)
    child = children[0]
    assert len(sink.messages) == 1
    # The client's window update, then the grace timer, in the same loop iteration.
    sink.writable = True
    call.writable()
    grace = child._grace
    assert grace is not None
    grace.cancel()
    child._stop_waiting()
    assert call.task is not None
    await asyncio.wait_for(asyncio.shield(call.task), 5.0)
    assert sink.status == Status.OK, sink.message
    assert sink.messages == replies


@aio_test
async def test_a_streamed_reply_that_cannot_be_converted_fails_the_call_uncharged(tmp_path: Path) -> None:
    """A reply frame with no JSON form, for a JSON client, fails the paid call and it is not
    charged (the conversion error escaped into the reactor, which closed stdout: the executable
    exited 0 and the call ended OK, and charged, with its reply missing)."""
    ledger = RecordingLedger()
    gate = PaymentGate(_adapter(_replying(tmp_path, _frame(_unprintable_reply()))), ledger)  # type: ignore[arg-type]
    call, sink = new_call("/demo.Demo/Split", content_type="application/grpc+json", timeout=5.0)
    call.metadata = ESCROW_PAYMENT
    call.deliver(json_bytes({"text": "go"}))
    call.end_input()
    start_call(gate, call)
    assert call.task is not None
    await call.task
    assert sink.status == Status.INTERNAL, sink.message
    assert sink.messages == []
    assert (ledger.committed, ledger.released) == (False, True)


@aio_test
async def test_any_error_relaying_a_streamed_reply_fails_the_call_and_is_logged_once(
    python: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong handing a reply frame on (not only a GrpcError) ends the call with
    INTERNAL, logged once with its traceback, and the executable is killed."""

    def broken(self: object, data: bytes) -> bytes:
        raise RuntimeError("converter bug")

    monkeypatch.setattr(process_module._Codec, "reply", broken)
    with captured() as events:
        sink = await invoke(_adapter(python), "/demo.Demo/Split", [request_bytes(text="a b c d")], timeout=5.0)
    assert (sink.status, sink.message) == (Status.INTERNAL, "the executable's reply could not be converted")
    failures = [event for event in events if "log_failure" in event]
    assert len(failures) == 1
    assert "converter bug" in str(failures[0]["log_failure"].value)


@aio_test
async def test_a_reply_without_a_json_form_is_a_clean_internal_error(tmp_path: Path) -> None:
    """A unary reply that parses but cannot be printed as JSON, for a JSON client, is INTERNAL
    saying so (it was an unexpected error: "internal error" and a traceback on every call)."""
    adapter = _adapter(_replying(tmp_path, _unprintable_reply()))
    with captured() as events:
        sink = await invoke(adapter, "/demo.Demo/Echo", [json_bytes({})], content_type="application/grpc+json")
    assert sink.status == Status.INTERNAL
    assert sink.message.startswith("service answer is not a valid demo.Reply: "), sink.message
    assert not [event for event in events if "log_failure" in event]


@pytest.mark.parametrize("name", ["--config=x y", "-h", "..", "a b", ""])
@aio_test
async def test_without_protos_a_method_name_that_is_no_identifier_runs_nothing(tmp_path: Path, name: str) -> None:
    """The client's method name becomes the executable's argument: without protos to check it
    against, anything but a protobuf identifier is UNIMPLEMENTED (it was passed on, so
    ``/svc.S/--config=x`` reached the executable as an option)."""
    started = tmp_path / "started"
    exe = tmp_path / "record.sh"
    exe.write_text(f'#!/bin/sh\necho "$@" >> {started}\ncat\n')
    exe.chmod(0o755)
    adapter = _adapter(str(exe), encoding="json", use_protos=False)
    sink = await invoke(adapter, f"/svc.S/{name}", [b"{}"], content_type="application/grpc+json")
    assert sink.status == Status.UNIMPLEMENTED
    assert "is not a protobuf identifier" in sink.message
    ok = await invoke(adapter, "/svc.S/Fine_2", [b"{}"], content_type="application/grpc+json")
    assert (ok.status, ok.messages) == (Status.OK, [b"{}"])
    assert started.read_text() == "Fine_2\n"


@aio_test
async def test_a_streamed_json_request_that_is_no_unicode_is_invalid_argument(python: str) -> None:
    """A client-stream message holding an escaped lone surrogate, for a JSON executable (whose
    stdin gets one re-encoded document per line), is INVALID_ARGUMENT, not "internal error"."""
    adapter = _adapter(python, encoding="json")
    sink = await invoke(adapter, "/demo.Demo/Join", [json_bytes({"text": "a"}), b'{"text": "\\ud800"}'])
    assert sink.status == Status.INVALID_ARGUMENT
    assert "lone UTF-16 surrogate" in sink.message


@aio_test
async def test_an_exited_executable_is_not_held_open_by_a_process_that_left_its_group(tmp_path: Path) -> None:
    """The executable answers and exits 0, but a process it started in its own session keeps
    stdout open: after a short grace the call ends OK with the reply (it waited for the escaped
    process until the deadline: DEADLINE_EXCEEDED, with the slot held), and a warning is logged."""
    pidfile = tmp_path / "escaped"
    exe = tmp_path / "escape.sh"
    exe.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        f"setsid sh -c 'echo $$ > {pidfile}.new; mv {pidfile}.new {pidfile}; exec sleep 30' &\n"
        f"while [ ! -e {pidfile} ]; do sleep 0.01; done\nprintf '{{}}'\n"
    )
    exe.chmod(0o755)
    adapter = _adapter(str(exe), encoding="json", use_protos=False)
    start = time.monotonic()
    try:
        with captured() as events:
            sink = await invoke(adapter, "/svc.S/M", [b"{}"], content_type="application/grpc+json", timeout=5.0)
    finally:
        for pid in pids_alive(pidfile):
            os.kill(pid, 9)
    assert (sink.status, sink.messages) == (Status.OK, [b"{}"]), sink.message
    assert time.monotonic() - start < 3
    assert adapter.limiter.running == 0
    assert len([text for text in _texts(events) if "output stayed open" in text]) == 1
