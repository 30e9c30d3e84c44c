"""``service_type: process``: run ``executable_path`` once per call.

The contract with the executable (``docs/service-types.md`` has it for
service authors):

* it is started as ``executable_path <Method>`` (the method's short name, as
  in the Go daemon), in its own session and process group, with the
  daemon's environment minus ``SNET_*`` variables (which may hold the
  daemon's keys) plus ``SNETD_METHOD`` (``/package.Service/Method``),
  ``SNETD_ENCODING`` (``proto`` or ``json``: what its stdin and stdout
  carry) and ``SNETD_STREAMING`` (``none``, ``client``, ``server``, ``bidi``
  or ``unknown`` without protos);
* stdin carries the request, then is closed; stdout is the reply; stderr
  goes to the daemon's log, line by line (bounded), never to the client;
* exit status 0 is success; anything else is ``INTERNAL`` ("executable
  exited with status 3"), and the client never sees stderr;
* the call's deadline (the client's, or ``service_timeout``) and client
  cancellation kill the whole process group with ``SIGKILL``; the client
  gets ``DEADLINE_EXCEEDED`` / nothing, from the front end.  Processes left
  in the group when the executable exits are killed too; one that left the
  group and keeps stdout open is waited for until stdout has been silent
  for :data:`EXIT_GRACE` (the call ends with what was read).

What the bytes are: the messages in the service's ``encoding``: protobuf
for ``proto``, JSON text for ``json``.  When a client sends JSON to a
``proto`` service (``+json`` content types) and the protos are known, the
daemon converts both ways; without protos the bytes pass unchanged, as in
Go.  A unary direction is the bare message (exactly the Go daemon's
contract); a streaming direction is framed: ``proto`` uses gRPC's own
framing (a zero byte, a 4-byte big-endian length, the message) and
``json`` one JSON document per line.  Input streams are written as the
client's messages arrive and output frames are sent as soon as they are
complete, so one process serves a whole bidirectional call.  Without protos
(the call kind is unknown), each request message runs the executable once
and its stdout is one reply.

Large inputs and outputs do not deadlock (the Go daemon's #169): stdin is
written in pieces under the pipe's flow control while stdout is read, and a
reply stream stops being read while the client is not reading.  At most
``max_concurrent_processes`` executables run at once; further calls wait in
order (their deadline still applies).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Final

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IPushProducer, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from snet_daemon import jsontext
from snet_daemon.frontend.call import ServerCall
from snet_daemon.frontend.status import GrpcError, Status
from snet_daemon.frontend.wire import Metadata
from snet_daemon.upstream.protos import MethodInfo, ServiceProtos, client_sends_json, request_text, short_name

__all__ = ["ProcessLimiter", "ProcessUpstream", "child_environment", "default_process_limit", "find_executable"]

_log = Logger(namespace="snetd.upstream.process")

#: Bytes written to stdin at a time.
STDIN_PIECE: Final = 64 * 1024
#: stderr logged per run; the rest is counted, not logged.
STDERR_LOG_LIMIT: Final = 64 * 1024
#: Longest stderr line logged.
_STDERR_LINE: Final = 2000
#: The gRPC-style frame header used on framed (streaming) proto pipes.
_FRAME_HEADER: Final = 5
#: Seconds the pipes may stay open once the executable exited without
#: delivering anything, before the call ends without waiting for them (see
#: :meth:`_Child.processExited`).
EXIT_GRACE: Final = 1.0


def default_process_limit() -> int:
    """Twice the CPUs: executables are usually CPU-bound, and a few may wait on I/O."""
    return 2 * (os.cpu_count() or 1)


def find_executable(path: str) -> str:
    """``executable_path`` as an absolute path to an executable file.

    A name without a slash is looked up on ``PATH`` (as Go's ``exec.Command``
    does).

    Raises:
        ValueError: it does not exist or is not executable.
    """
    if not path:
        raise ValueError("executable_path is empty; service_type 'process' needs it")
    found = shutil.which(path) if "/" not in path else (path if os.access(path, os.X_OK) else None)
    if found is None or not os.path.isfile(found):
        raise ValueError(f"executable_path {path!r} is not an executable file")
    return os.path.abspath(found)


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment without ``SNET_*`` (configuration, possibly keys)."""
    return {key: value for key, value in environ.items() if not key.upper().startswith("SNET_")}


class ProcessLimiter:
    """Lets at most ``limit`` executables run; later calls wait, first come first served.

    Args:
        limit: processes allowed at once (at least 1).
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.running = 0
        self._waiting: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot."""
        return sum(1 for waiter in self._waiting if not waiter.done())

    async def acquire(self) -> None:
        """Take a slot, waiting for one if needed (cancellable: the place is given up)."""
        if self.running < self.limit and not self.waiting:
            self.running += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled.
                self.release()
            raise
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)

    def release(self) -> None:
        """Give a slot back (to the first waiter, if any)."""
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; running stays the same
                return
        self.running -= 1


class _Codec:
    """Converts between the client's message format and the executable's."""

    def __init__(self, method: MethodInfo | None, client_json: bool, service_json: bool) -> None:
        self.method = method
        self.client_json = client_json
        self.service_json = service_json
        # Only a JSON client of a proto service with known protos is converted.
        self.convert = method is not None and client_json and not service_json

    def request(self, data: bytes) -> bytes:
        if not self.convert:
            return data
        assert self.method is not None
        return self.method.request_from_json(_load_json(data, Status.INVALID_ARGUMENT, "request message"))

    def reply(self, data: bytes) -> bytes:
        if not self.convert:
            return data
        assert self.method is not None
        return json.dumps(self.method.reply_to_json(data), separators=(",", ":")).encode()


def _load_json(data: bytes, status: Status, what: str) -> Any:
    try:
        return jsontext.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise GrpcError(status, f"{what} is not JSON: {exc}") from None


def _frame(data: bytes, service_json: bool) -> bytes:
    """One message on a streaming stdin."""
    if service_json:
        # One document per line, whatever whitespace the client used.
        return request_text(_load_json(data, Status.INVALID_ARGUMENT, "request message")) + b"\n"
    return b"\0" + len(data).to_bytes(4, "big") + data


@implementer(IPushProducer)
class _Child(ProcessProtocol):
    """One run of the executable, as seen from the reactor.

    It is also the push producer feeding stdin: the pipe pauses it when its
    buffer is full and resumes it when the child has read.

    Args:
        loop: the asyncio loop.
        label: names the run in logs.
        stdout_limit: most bytes of an unframed stdout, or of one frame.
        on_reply: called with each reply message of a framed stdout; None
            collects stdout as one reply.
        service_json: framed stdout is JSON lines (else gRPC frames).
        on_ended: called once the process has ended and its pipes closed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        label: str,
        *,
        stdout_limit: int,
        on_reply: Callable[[bytes], None] | None,
        service_json: bool,
        on_ended: Callable[[], None],
    ) -> None:
        self.label = label
        self.pid: int | None = None
        self.group = False
        self._loop = loop
        self._limit = stdout_limit
        self._on_reply = on_reply
        self._json = service_json
        self._on_ended = on_ended
        self._out: list[bytes] = []
        self._out_size = 0
        self._frames = bytearray()
        self._err = bytearray()
        self._err_logged = 0
        self._err_dropped = 0
        self._stdin_open = True
        self._stdin_ready: asyncio.Future[None] | None = None
        self._paused = False
        self._reading_paused = False
        self._grace: asyncio.TimerHandle | None = None
        #: Counts stdout reads and resumptions of reading: the grace timer
        #: gives up on the pipes only when it did not move for a whole grace.
        self._progress = 0
        self._progress_seen = 0
        self.exited = False
        self.error: GrpcError | None = None
        #: Resolves with the exit reason once the process ended and its pipes closed.
        self.ended: asyncio.Future[Failure] = loop.create_future()

    # -- stdin (producer side) ------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._wake_stdin()

    def stopProducing(self) -> None:
        self._stdin_open = False
        self._wake_stdin()

    def _wake_stdin(self) -> None:
        if self._stdin_ready is not None and not self._stdin_ready.done():
            self._stdin_ready.set_result(None)

    async def write(self, data: bytes) -> bool:
        """Write ``data`` to stdin under flow control; False once the child closed stdin."""
        view = memoryview(data)
        for start in range(0, len(view), STDIN_PIECE):
            while self._paused and self._stdin_open:
                self._stdin_ready = self._loop.create_future()
                try:
                    await self._stdin_ready
                finally:
                    self._stdin_ready = None
            if not self._stdin_open:
                return False
            assert self.transport is not None
            self.transport.write(bytes(view[start : start + STDIN_PIECE]))
        return self._stdin_open

    def close_stdin(self) -> None:
        """No more input: the child sees end of file once the buffered input is read."""
        if self._stdin_open and self.transport is not None:
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.closeStdin()

    # -- ProcessProtocol -------------------------------------------------------

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]

    def outReceived(self, data: bytes) -> None:
        self._progress += 1
        self._take_output(data)

    def _take_output(self, data: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self._on_reply is None:
                self._out_size += len(data)
                if self._out_size > self._limit:
                    raise GrpcError(
                        Status.RESOURCE_EXHAUSTED, f"the executable's reply is larger than {self._limit} bytes"
                    )
                self._out.append(data)
            else:
                self._frames += data
                self._emit_frames()
        except GrpcError as error:
            self.fail(error)
        except Exception:
            # Nothing may escape into the reactor: it would close stdout, and
            # an executable that then exits 0 would end the call OK (and
            # charged) with replies missing.  The run is failed instead, and
            # logged once (later output is ignored once it failed).
            _log.failure("executable {label}: a reply could not be relayed", label=self.label)
            self.fail(GrpcError(Status.INTERNAL, "the executable's reply could not be converted"))

    def errReceived(self, data: bytes) -> None:
        self._err += data
        while (end := self._err.find(b"\n")) >= 0:
            line = bytes(self._err[:end])
            del self._err[: end + 1]
            self._log_stderr(line)
        if len(self._err) > _STDERR_LINE:
            self._log_stderr(bytes(self._err))
            self._err.clear()

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == 0:
            self._stdin_open = False
            self._wake_stdin()

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        # Whatever the executable left running in its group dies with it, so
        # that no stray process keeps the pipes (and the call) open.
        self._kill_group()
        # A process that left the group (its own setsid) may still hold
        # them: the call would wait for it until its deadline, holding a
        # slot.  The pipes get a short while to deliver what the executable
        # wrote, then are closed.
        self._arm_grace()

    def processEnded(self, reason: Failure) -> None:
        self.exited = True
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._err:
            self._log_stderr(bytes(self._err))
            self._err.clear()
        if self._err_dropped:
            _log.info(
                "executable {label}: {dropped} more bytes of stderr not logged",
                label=self.label,
                dropped=self._err_dropped,
            )
        if not self.ended.done():
            self.ended.set_result(reason)
        self._on_ended()

    # -- results -----------------------------------------------------------------

    def stdout(self) -> bytes:
        """Everything the child wrote (unframed mode)."""
        return b"".join(self._out)

    def end_output(self) -> None:
        """The output is over (framed mode): a last JSON line without its newline is the last reply.

        JSON Lines allow it (``printf`` output often ends so), and the http
        adapter takes such an answer: it is relayed like any other line,
        failing the run as they do when it is no reply.
        """
        if self._json and self._on_reply is not None and self._frames.strip():
            self._take_output(b"\n")

    def leftover(self) -> int:
        """Bytes of an incomplete last frame (framed mode)."""
        return len(self._frames.strip()) if self._json else len(self._frames)

    def fail(self, error: GrpcError) -> None:
        """End the run with ``error`` (the first one wins): the process is killed."""
        if self.error is None:
            self.error = error
        self.kill()

    def pause_reading(self) -> None:
        """Stop reading stdout (the client is not reading the replies)."""
        self._reading_paused = True
        if self.transport is not None:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resume_reading(self) -> None:
        """Read stdout again."""
        if self._reading_paused:
            # What is left in the pipe is read from now on: a grace timer
            # due in this same loop iteration must not close it first.
            self._progress += 1
        self._reading_paused = False
        # Not ``exited``: an executable that exited may still have replies
        # in the pipe, which must be read for the call to end.
        if self.transport is not None and not self.ended.done():
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def kill(self) -> None:
        """Kill the process group now, and stop listening to the pipes."""
        if not self.exited:
            # Once the executable was reaped, processExited killed its group
            # for the last time: the group's id, its pid, may since belong
            # to another process group.
            self._kill_group()
        transport = self.transport
        if transport is not None:
            try:
                transport.signalProcess("KILL")
            except (ProcessExitedAlready, OSError):
                pass
            transport.loseConnection()

    def _kill_group(self) -> None:
        """SIGKILL the run's process group (its id is the executable's pid, as a ``setsid`` leader).

        Only while the executable is not reaped, or as it is (in
        processExited): the id is then still taken, by the executable or
        by the group's other members.  Later, once they are gone, the
        system may give it to an unrelated process and group.
        """
        if self.group and self.pid is not None:
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- internals ---------------------------------------------------------------

    def _emit_frames(self) -> None:
        assert self._on_reply is not None
        frames = self._frames
        while True:
            if self._json:
                end = frames.find(b"\n")
                if end < 0:
                    if len(frames) > self._limit:
                        raise GrpcError(Status.RESOURCE_EXHAUSTED, f"a reply line is longer than {self._limit} bytes")
                    return
                line = bytes(frames[:end]).strip()
                del frames[: end + 1]
                if line:
                    self._on_reply(line)
                continue
            if len(frames) < _FRAME_HEADER:
                return
            if frames[0] != 0:
                raise GrpcError(Status.INTERNAL, "the executable wrote a malformed reply frame (first byte must be 0)")
            size = int.from_bytes(frames[1:_FRAME_HEADER], "big")
            if size > self._limit:
                raise GrpcError(Status.RESOURCE_EXHAUSTED, f"a reply frame is larger than {self._limit} bytes")
            if len(frames) < _FRAME_HEADER + size:
                return
            message = bytes(frames[_FRAME_HEADER : _FRAME_HEADER + size])
            del frames[: _FRAME_HEADER + size]
            self._on_reply(message)

    def _arm_grace(self) -> None:
        self._progress_seen = self._progress
        self._grace = self._loop.call_later(EXIT_GRACE, self._stop_waiting)

    def _stop_waiting(self) -> None:
        """The executable exited and its pipes stayed open and silent for :data:`EXIT_GRACE`: close them.

        The run then ends with the exit status and the output read so far;
        closing the pipes discards whatever is still unread in them.  So
        the wait starts over while the client is not reading (what is left
        in the pipe is still the executable's reply), and whenever output
        arrived or reading resumed since the last look: only a pipe that
        is held open without being written to is given up.
        """
        self._grace = None
        if self.ended.done() or self.transport is None:
            return
        if self._reading_paused or self._progress != self._progress_seen:
            self._arm_grace()
            return
        _log.warn(
            "executable {label} (pid {pid}) exited but its output stayed open and silent for {grace:g}s "
            "(held by a process it started outside its process group?); not waiting for it",
            label=self.label,
            pid=self.pid,
            grace=EXIT_GRACE,
        )
        self.transport.loseConnection()

    def _log_stderr(self, line: bytes) -> None:
        if self._err_logged >= STDERR_LOG_LIMIT:
            self._err_dropped += len(line) + 1
            return
        self._err_logged += len(line) + 1
        text = line[:_STDERR_LINE].decode("utf-8", errors="replace").rstrip()
        _log.info("executable {label} stderr: {line}", label=self.label, line=text)


def _streaming(method: MethodInfo | None) -> str:
    if method is None:
        return "unknown"
    return {(False, False): "none", (True, False): "client", (False, True): "server", (True, True): "bidi"}[
        (method.client_streaming, method.server_streaming)
    ]


def _describe_exit(reason: Failure) -> str | None:
    """None for a clean exit, else what happened, for the client."""
    if reason.check(ProcessDone):
        return None
    value = reason.value
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            return f"the executable was killed by signal {value.signal}"
        return f"the executable exited with status {value.exitCode}"
    return f"the executable failed: {value}"  # pragma: no cover - Twisted only reports the two above


class ProcessUpstream:
    """The handler for ``service_type: process``.

    Args:
        reactor: spawns the processes.
        executable: ``executable_path``, resolved (:func:`find_executable`).
        protos: the service's protos, or None (then each request message
            runs the executable once and nothing is converted).
        encoding: the metadata's ``encoding``: what stdin/stdout carry.
        limiter: shared limit on running processes.
        environ: the environment to start from (``SNET_*`` is removed).
        max_message_size: the largest reply (stdout, or one frame), bytes.
        setsid: the ``setsid`` program that puts each run in its own session
            and process group, or None to find it; ``""`` disables it (then
            only the executable itself is killed, not its children).
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        executable: str,
        *,
        protos: ServiceProtos | None,
        encoding: str,
        limiter: ProcessLimiter,
        environ: Mapping[str, str],
        max_message_size: int = 4 * 1024 * 1024,
        setsid: str | None = None,
    ) -> None:
        self._reactor = reactor
        self.executable = executable
        self.protos = protos
        self.encoding = encoding
        self.limiter = limiter
        self._environ = child_environment(environ)
        self._max_message = max_message_size
        self._setsid = shutil.which("setsid") if setsid is None else (setsid or None)
        if self._setsid is None:
            _log.warn(
                "no setsid program found: executables are not put in their own process group, "
                "so only the executable itself (not its children) is killed at a deadline"
            )

    async def __call__(self, call: ServerCall) -> None:
        """Serve ``call`` (metadata is not passed to executables, as in Go)."""
        await self.forward(call, call.metadata)

    async def forward(self, call: ServerCall, metadata: Metadata) -> None:
        """Serve ``call`` by running the executable; ``metadata`` is not passed on."""
        method = self.protos.require(call.method) if self.protos is not None else None
        name = short_name(call.method)  # checked: it becomes the executable's argument
        service_json = self.encoding == "json"
        codec = _Codec(method, client_sends_json(call, self.encoding), service_json)
        if method is None:
            while (data := await call.read()) is not None:
                await self._run(call, name, codec, _single(codec.request(data)), framed_out=False)
            return
        if method.client_streaming:
            requests = self._stream(call, codec)
        else:
            data = call.request_if_complete()
            if data is None:
                data = await call.read()
                if data is None or await call.read() is not None:
                    raise GrpcError(Status.INVALID_ARGUMENT, f"{method.path} takes exactly one request message")
            requests = _single(codec.request(data))
        await self._run(call, name, codec, requests, framed_out=method.server_streaming)

    async def _stream(self, call: ServerCall, codec: _Codec) -> AsyncIterator[bytes]:
        while (data := await call.read()) is not None:
            yield _frame(codec.request(data), codec.service_json)

    async def _run(
        self, call: ServerCall, name: str, codec: _Codec, requests: AsyncIterator[bytes], *, framed_out: bool
    ) -> None:
        await self.limiter.acquire()
        loop = asyncio.get_running_loop()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.limiter.release()

        def on_reply(data: bytes) -> None:
            call.write(codec.reply(data))
            if not call.can_write():
                child.pause_reading()

        child = _Child(
            loop,
            f"{call.method}",
            stdout_limit=self._max_message,
            on_reply=on_reply if framed_out else None,
            service_json=codec.service_json,
            on_ended=release,
        )
        args = [self.executable, name]
        executable = self.executable
        if self._setsid is not None:
            executable, args = self._setsid, ["setsid", "--", *args]
            child.group = True
        env = {
            **self._environ,
            "SNETD_METHOD": call.method,
            "SNETD_ENCODING": "json" if codec.service_json else "proto",
            "SNETD_STREAMING": _streaming(codec.method),
        }
        try:
            self._reactor.spawnProcess(child, executable, args, env=env)
        except Exception as exc:
            release()
            _log.error("cannot start executable {path}: {error}", path=self.executable, error=exc)
            raise GrpcError(Status.INTERNAL, "the executable could not be started") from None
        if framed_out:
            call.on_writable = child.resume_reading
        feeder = asyncio.ensure_future(self._feed(child, requests))
        try:
            waits: list[asyncio.Future[Any]] = [feeder, child.ended]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if feeder.done() and feeder.exception() is not None:
                await feeder  # raises: the request stream failed
            reason = await child.ended
        except BaseException as exc:
            if not child.exited and isinstance(exc, asyncio.CancelledError):
                _log.info(
                    "executable {label} (pid {pid}) killed: the call ended first", label=child.label, pid=child.pid
                )
            child.kill()
            raise
        finally:
            if not feeder.done():
                feeder.cancel()
            if framed_out:
                call.on_writable = None
        if child.error is not None:
            raise child.error
        failure = _describe_exit(reason)
        if failure is not None:
            _log.warn("executable {label} (pid {pid}): {failure}", label=child.label, pid=child.pid, failure=failure)
            raise GrpcError(Status.INTERNAL, failure)
        if framed_out:
            child.end_output()
            if child.error is not None:
                raise child.error
            if child.leftover():
                raise GrpcError(Status.INTERNAL, "the executable's output ends with an incomplete reply frame")
            return
        call.write(codec.reply(child.stdout()))
        await call.drain()

    @staticmethod
    async def _feed(child: _Child, requests: AsyncIterator[bytes]) -> None:
        try:
            async for data in requests:
                if not await child.write(data):
                    return  # the child closed stdin: it wants no more input
            child.close_stdin()
        except GrpcError as error:
            child.fail(error)
            raise


async def _single(data: bytes) -> AsyncIterator[bytes]:
    yield data
