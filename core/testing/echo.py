"""Echo servers and clients for end-to-end tests: real sockets in test namespaces.

A server (`start_echo`) runs as a child process in a namespace of a kpr.testing.netns
Topology and listens on [::]:PORT for TCP and UDP, both families. It answers who it is, so a
test sees which backend a connection reached and, with `peer=True` (the default), which
client address that backend saw (source NAT shows there):

- TCP: one line "<name> <client address>\\n" ("<name>\\n" with peer=False), then echoes every
  byte until EOF;
- UDP: each datagram gets "<name> <client address>" ("<name>" with peer=False); the payload
  b"echo" is sent back unchanged instead.

The client (`client`) runs one command per call in a namespace, optionally inside a child
cgroup (socket hooks see only sockets made in their cgroup), and returns one dict per
attempt, parsed from the JSON line it printed:

    tcp HOST PORT [N]      connect, getpeername, read the first line
                           -> {"peer": [addr, port], "answer": "...", "ms": ...}
    udp HOST PORT [N]      unconnected sendto + recvfrom (the reply's source shows the
                           reverse NAT) -> {"src": [addr, port], "answer": ..., "ms": ...}
    udpconn HOST PORT [N]  connect, send, recv -> {"peer": ..., "answer": ..., "ms": ...}
    bind HOST PORT tcp|udp -> {"ok": true, "bound": [...]}
    hold HOST PORT tcp|udp connect and print; then per stdin line: `peer` (getpeername) or
                           `wait` (block until the socket is closed or destroyed)
    http HOST PORT         GET /healthz -> {"status": code, "body": {...}}

Options after the positional ones: `timeout=S` (per socket, default 3), `gap=S` (sleep between
attempts), `sport=P` (a fixed source port), `-6` (IPv6 even for a name). A failed attempt is
{"error": "<errno name>"} instead of an answer: tests assert on it, nothing is retried.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CLIENT",
    "CLIENT_PRELUDE",
    "PY",
    "SERVER",
    "answers",
    "answers_or_errors",
    "client",
    "client_argv",
    "name_and_peer",
    "start_echo",
]

# The system's interpreter: the child needs nothing but the standard library, and the venv's
# may not exist inside a namespace that remounts /sys (`ip netns exec`).
PY = shutil.which("python3", path="/usr/bin:/bin") or "python3"

SERVER = r"""
import socket, sys, threading
name, port = sys.argv[1], int(sys.argv[2])
answer = sys.argv[3] if len(sys.argv) > 3 else "peer"
def bare(h):
    return h[7:] if h.startswith("::ffff:") else h
def who(a):
    return f"{name} {bare(a[0])}" if answer == "peer" else name
def conn(c, a):
    with c:
        # "reached": the address this connection reached (one server tells many backend
        # addresses apart); otherwise the server's name, with the peer's address.
        c.sendall(((bare(c.getsockname()[0]) if answer == "reached" else who(a)) + "\n").encode())
        while True:
            d = c.recv(65536)
            if not d:
                return
            c.sendall(d)
def tcp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port)); s.listen(1024)
    while True:
        c, a = s.accept()
        threading.Thread(target=conn, args=(c, a), daemon=True).start()
def udp():
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        d, a = s.recvfrom(65536)
        s.sendto(d if d == b"echo" else who(a).encode(), a)
threading.Thread(target=udp, daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

# What the `python -c` clients share (CLIENT here, kpr.testing.restart_probe's PROBE, the
# socklb tests' LOAD), prepended to their scripts: an error's name, and a server's greeting
# line read to its end ("eof" as ECONNRESET when the server closes before it: a loop that added
# recv()'s b"" would spin forever).
CLIENT_PRELUDE = r"""
import errno
def err(e):
    return errno.errorcode.get(getattr(e, "errno", None) or 0, type(e).__name__)
def greeting(s):
    d = b""
    while not d.endswith(b"\n"):
        c = s.recv(512)
        if not c:
            raise ConnectionResetError(errno.ECONNRESET, "eof")
        d += c
    return d.decode().strip()
"""

CLIENT = CLIENT_PRELUDE + r"""
import json, socket, sys, time, urllib.request, urllib.error
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
rest = sys.argv[4:]
opts = dict(a.split("=", 1) for a in rest if "=" in a)
words = [a for a in rest if "=" not in a and a != "-6"]
fam = socket.AF_INET6 if (":" in host or "-6" in rest) else socket.AF_INET
timeout, gap = float(opts.get("timeout", 3)), float(opts.get("gap", 0))
def out(**kw):
    print(json.dumps(kw), flush=True)
def peer(a):
    return [a[0], a[1]]
def line(s):
    d = b""
    while not d.endswith(b"\n"):
        c = s.recv(512)
        if not c:
            break
        d += c
    return d.decode().strip()
if mode == "http":
    h = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{h}:{port}/healthz", timeout=timeout) as r:
            out(status=r.status, body=json.loads(r.read()))
    except urllib.error.HTTPError as e:
        out(status=e.code, body=json.loads(e.read()))
    except OSError as e:
        out(error=err(e.reason if isinstance(getattr(e, "reason", None), OSError) else e))
elif mode in ("tcp", "udp", "udpconn"):
    for i in range(int(words[0]) if words else 1):
        if i and gap:
            time.sleep(gap)
        t0 = time.monotonic()
        s = socket.socket(fam, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
        s.settimeout(timeout)
        try:
            if "sport" in opts:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", int(opts["sport"])))
            if mode == "udp":
                s.sendto(b"hi", (host, port))
                d, a = s.recvfrom(512)
                out(src=peer(a), answer=d.decode(), ms=(time.monotonic() - t0) * 1e3)
                continue
            s.connect((host, port))
            p = peer(s.getpeername())
            if mode == "udpconn":
                s.send(b"hi")
                answer = s.recv(512).decode().strip()
            else:
                answer = line(s)
            out(peer=p, answer=answer, ms=(time.monotonic() - t0) * 1e3)
        except OSError as e:
            out(error=err(e), ms=(time.monotonic() - t0) * 1e3)
        finally:
            s.close()
elif mode == "bind":
    s = socket.socket(fam, socket.SOCK_STREAM if words[0] == "tcp" else socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        out(ok=True, bound=peer(s.getsockname()))
    except OSError as e:
        out(error=err(e))
elif mode == "hold":
    kind = socket.SOCK_STREAM if words[0] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.settimeout(5)
    s.connect((host, port))
    if kind == socket.SOCK_DGRAM:
        s.send(b"hi")
    out(peer=peer(s.getpeername()), answer=s.recv(512).decode().strip())
    for cmd in sys.stdin:
        cmd = cmd.strip()
        if cmd == "peer":
            try:
                out(peer=peer(s.getpeername()))
            except OSError as e:
                out(error=err(e))
        elif cmd == "wait":
            s.settimeout(20)
            t0 = time.monotonic()
            try:
                d = s.recv(512)
                out(event="eof" if not d else "data", after=time.monotonic() - t0)
            except OSError as e:
                out(event="error", error=err(e), after=time.monotonic() - t0)
else:
    sys.exit(f"unknown mode {mode!r}")
"""


def start_echo(
    ns: Any, name: str | None = None, port: int = 8080, *, peer: bool = True, reached: bool = False
) -> subprocess.Popen[str]:
    """Start an echo server in `ns` (a kpr.testing.netns.Namespace: its topology stops it at
    teardown) answering as `name` (default: the namespace's name) and, with `peer`, the
    client's address; with `reached`, a TCP connection is answered the address it reached
    instead (UDP still the name); returns once it listens."""
    name = name or ns.name
    answer = "reached" if reached else "peer" if peer else "name"
    proc = ns.popen([PY, "-c", SERVER, name, str(port), answer], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"echo server {name} in {ns.netns} did not start: {line!r}")
    return proc


def client_argv(*args: Any) -> list[str]:
    """The command line of one client run (for popen, or a run in a cgroup of one's own)."""
    return [PY, "-c", CLIENT, *map(str, args)]


def client(ns: Any, *args: Any, cgroup: Path | None = None, timeout: float = 60, input: str | None = None) -> list[dict]:
    """Run the client in `ns` (a Namespace), inside `cgroup` when given; one dict per line."""
    if cgroup is not None:
        from kpr.testing.cgroup import run_in_cgroup

        res = run_in_cgroup(cgroup, client_argv(*args), ns, timeout=timeout, input=input)
    else:
        res = ns.run(client_argv(*args), timeout=timeout, input=input)
    return parse_rows(res.stdout)


def parse_rows(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def answers(rows: Sequence[dict]) -> list[str]:
    """The answers of a client's rows; any error fails the test, naming it."""
    bad = [r for r in rows if "error" in r]
    assert not bad, f"client errors: {bad}"
    return [r["answer"] for r in rows]


def answers_or_errors(rows: Sequence[dict]) -> list[str]:
    """Each row's answer, or its error's name where it failed (for tests that expect some)."""
    return [r.get("answer") or r.get("error", "?") for r in rows]


def name_and_peer(rows: Sequence[dict]) -> list[tuple[str, str]]:
    """(backend name, client address it saw) per answer of a peer=True server (the error's
    name and "" for a failure)."""
    out = []
    for a in answers_or_errors(rows):
        name, _, seen = a.partition(" ")
        out.append((name, seen))
    return out


@dataclass
class Running:
    """A long-running client (started by `start_running`) whose last line of output is its JSON
    summary: `finish()` closes its stdin, which tells it to stop, and returns the summary."""

    proc: subprocess.Popen
    timeout: float = 30.0

    def finish(self) -> dict:
        out, _ = self.proc.communicate(timeout=self.timeout)
        return json.loads(out.strip().splitlines()[-1])


def start_running(topo: Any, ns: str, argv: Sequence[str], *, cgroup: Path | None = None, what: str = "client",
                  timeout: float = 30.0) -> Running:
    """`argv` in namespace `ns` of `topo` (and in `cgroup`, where socket hooks must see it), once
    it has printed "started" (its set-up, a held connection for instance, is done)."""
    kw: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    if cgroup is not None:
        from kpr.testing.cgroup import popen_in_cgroup

        proc = popen_in_cgroup(cgroup, list(argv), topo[ns], **kw)
    else:
        proc = topo.popen(ns, list(argv), **kw)
    return await_started(proc, what=what, timeout=timeout)


def await_started(proc: subprocess.Popen, *, what: str = "client", timeout: float = 30.0) -> Running:
    """The Running of `proc` once it has printed "started"; killed, and an error, otherwise."""
    line = proc.stdout.readline()
    if line.strip() != "started":
        proc.kill()
        proc.wait(timeout=30)
        raise RuntimeError(f"the {what} did not start: {line!r}")
    return Running(proc, timeout)
