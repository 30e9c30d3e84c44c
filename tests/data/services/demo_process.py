#!/usr/bin/env python3
"""The demo service (demo.proto) as a ``service_type: process`` executable.

Standard library only, so any Python 3 runs it.  Called as
``demo_process.py <Method>`` by the daemon; ``SNETD_ENCODING`` says whether
stdin/stdout carry protobuf or JSON, ``SNETD_STREAMING`` which directions
are framed (gRPC frames for protobuf, JSON lines for JSON).  ``DEMO_PIDFILE``,
when set, receives the pids ``Hang`` starts, so tests can check they were
killed.
"""

import base64
import json
import os
import subprocess
import sys
import time

ENCODING = os.environ.get("SNETD_ENCODING", "proto")
STREAMING = os.environ.get("SNETD_STREAMING", "none")
STDIN = sys.stdin.buffer
STDOUT = sys.stdout.buffer


# -- a minimal protobuf codec for demo.Request / demo.Reply -----------------


def _varint(data, i):
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def _fields(data):
    fields, i = {}, 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            size, i = _varint(data, i)
            value, i = data[i : i + size], i + size
        elif wire == 5:
            value, i = data[i : i + 4], i + 4
        elif wire == 1:
            value, i = data[i : i + 8], i + 8
        else:
            raise ValueError(f"wire type {wire}")
        fields[number] = value
    return fields


def _signed(value):
    """A varint read as a two's complement int64."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _put_varint(value):
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _put(number, value):
    if isinstance(value, int):
        return _put_varint(number << 3) + _put_varint(value) if value else b""
    return _put_varint(number << 3 | 2) + _put_varint(len(value)) + value if value else b""


def parse_request(data):
    """demo.Request as a dict: text, count, blob (bytes), options (dict)."""
    if ENCODING == "json":
        value = json.loads(data or b"{}")
        blob = value.get("blob", "")
        options = value.get("options", {})
        return {
            "text": value.get("text", ""),
            "count": int(value.get("count", 0)),
            "blob": base64.b64decode(blob) if blob else b"",
            "options": {key: (int(v) if key != "fail_message" else v) for key, v in options.items()},
        }
    fields = _fields(data)
    raw_options = _fields(fields.get(10, b""))
    return {
        "text": fields.get(1, b"").decode(),
        "count": _signed(fields.get(2, 0)),
        "blob": bytes(fields.get(3, b"")),
        "options": {
            "delay_ms": raw_options.get(1, 0),
            "fail_code": _signed(raw_options.get(2, 0)),
            "fail_message": raw_options.get(3, b"").decode(),
            "reply_size": raw_options.get(4, 0),
        },
    }


def reply(text="", count=0, blob=b"", index=0):
    """demo.Reply in the service's encoding."""
    if ENCODING == "json":
        value = {}
        if text:
            value["text"] = text
        if count:
            value["count"] = str(count)
        if blob:
            value["blob"] = base64.b64encode(blob).decode()
        if index:
            value["index"] = index
        return json.dumps(value).encode()
    return _put(1, text.encode()) + _put(2, count) + _put(3, blob) + _put(5, index)


# -- framing of streaming directions ----------------------------------------


def read_frames():
    """The request messages of a streaming stdin, as they arrive."""
    if ENCODING == "json":
        for line in STDIN:
            if line.strip():
                yield line
        return
    while True:
        header = STDIN.read(5)
        if len(header) < 5:
            return
        yield STDIN.read(int.from_bytes(header[1:], "big"))


def write_frame(message):
    if ENCODING == "json":
        STDOUT.write(message + b"\n")
    else:
        STDOUT.write(b"\0" + len(message).to_bytes(4, "big") + message)
    STDOUT.flush()


# -- the methods -------------------------------------------------------------


def echo(request):
    size = request["options"].get("reply_size", 0)
    blob = b"r" * size if size else request["blob"]
    return reply(request["text"], request["count"], blob)


def main(method):
    if method == "NoRead":
        STDOUT.write(reply("no-read"))
        return 0
    if method == "Hang":
        child = subprocess.Popen(["sleep", "1000"])
        pidfile = os.environ.get("DEMO_PIDFILE")
        if pidfile:
            with open(pidfile, "w") as out:
                out.write(f"{os.getpid()} {child.pid}\n")
        time.sleep(1000)
        return 0
    if method == "Join":
        texts = [parse_request(frame)["text"] for frame in read_frames()]
        STDOUT.write(reply(" ".join(texts), len(texts)))
        return 0
    if method == "Chat":
        for index, frame in enumerate(read_frames()):
            write_frame(reply(parse_request(frame)["text"].upper(), index=index))
        return 0
    request = parse_request(STDIN.read())
    options = request["options"]
    if method == "Fail":
        sys.stderr.write(f"demo_process: failing on purpose: {options.get('fail_message', '')}\n")
        return options.get("fail_code") or 3
    if method == "Slow":
        time.sleep(options.get("delay_ms", 0) / 1000)
    if method == "Noisy":
        for i in range(16 * 1024):
            sys.stderr.write(f"noise line {i:06d} " + "x" * 48 + "\n")
        sys.stderr.flush()
    if method == "Split":
        for index, word in enumerate(request["text"].split()):
            write_frame(reply(word, index=index))
        return 0
    if method in ("Echo", "Slow", "Noisy"):
        STDOUT.write(echo(request))
        return 0
    sys.stderr.write(f"demo_process: unknown method {method}\n")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
