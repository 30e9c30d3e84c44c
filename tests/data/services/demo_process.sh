#!/bin/sh
# The demo service (demo.proto) as a shell executable: the request bytes are
# the reply for Echo (demo.Reply shares demo.Request's field numbers 1-3, and
# JSON passes as is), whatever the encoding.
case "$1" in
  Echo)
    exec cat
    ;;
  Fail)
    echo "demo_process.sh: failing on purpose" >&2
    exit 7
    ;;
  NoRead)
    # An empty reply (a valid empty protobuf message), stdin never read.
    exit 0
    ;;
  Hang)
    sleep 1000 &
    if [ -n "$DEMO_PIDFILE" ]; then echo "$$ $!" > "$DEMO_PIDFILE"; fi
    sleep 1000
    ;;
  *)
    echo "demo_process.sh: unknown method $1" >&2
    exit 2
    ;;
esac
