#!/usr/bin/env python3
"""The helper ExaBGP runs (its process API): a relay between ExaBGP's pipes and the agent.

    bridge.py SOCKET

ExaBGP writes acknowledgements ("done"/"error") and JSON events (neighbor state) to our
stdin and reads commands from our stdout, one per line. The agent listens on the unix socket
SOCKET. The bridge connects, introduces itself with the token ExaBGP inherited from the
agent (KPR_BGP_BRIDGE_TOKEN, so the agent can tell one ExaBGP run from the next), then copies
lines both ways until either side closes. It holds no state: if it dies, ExaBGP starts it
again and the agent re-sends what should be announced.

Standard library only: ExaBGP may run it with any Python 3.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time

TOKEN_ENV = "KPR_BGP_BRIDGE_TOKEN"
# How long to keep trying to reach the agent before giving up (ExaBGP then respawns us a
# few times, and gives up itself when the agent is gone for good).
CONNECT_SECONDS = 5.0


def connect(path: str, deadline: float) -> socket.socket:
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.05)


def pump_stdin(sock: socket.socket) -> None:
    """ExaBGP -> agent. EOF means ExaBGP went away: nothing left to relay."""
    stdin = sys.stdin.buffer
    try:
        while True:
            line = stdin.readline()
            if not line:
                break
            sock.sendall(line)
    except OSError:
        pass
    finally:
        os._exit(0)


def pump_socket(sock: socket.socket) -> None:
    """agent -> ExaBGP, one command per line, flushed at once (ExaBGP reads line by line)."""
    out = sys.stdout.buffer
    reader = sock.makefile("rb")
    for line in reader:
        out.write(line)
        out.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: bridge.py SOCKET\n")
        return 2
    try:
        sock = connect(argv[1], time.monotonic() + CONNECT_SECONDS)
    except OSError as e:
        sys.stderr.write(f"kpr bridge: cannot reach the agent at {argv[1]}: {e}\n")
        return 1
    hello = {"hello": {"token": os.environ.get(TOKEN_ENV, ""), "pid": os.getpid(), "ppid": os.getppid()}}
    sock.sendall((json.dumps(hello) + "\n").encode())
    threading.Thread(target=pump_stdin, args=(sock,), daemon=True).start()
    try:
        pump_socket(sock)
    except (OSError, BrokenPipeError):
        pass
    # The agent closed the connection (or went away): exit, ExaBGP decides what follows.
    # os._exit: the stdin thread is blocked in a read that interpreter shutdown would wait on.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
