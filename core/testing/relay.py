"""A TCP relay for tests: a server on the host's loopback made reachable elsewhere.

Test servers such as kpr.testing.apiserver listen on 127.0.0.1 of the test process's own
namespace. `TcpRelay` listens on the loopback of a test namespace (agents there then use the
server's URL, and its certificate for 127.0.0.1, unchanged), or on another loopback port of
this namespace, and copies bytes both ways. `cut()` closes every relayed connection and
listener, so one client loses the server (connection refused) while others keep it: a
partial outage, undone by `listen()` on the same port again. It only ever listens on
127.0.0.1.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

from .netns import in_netns

log = logging.getLogger(__name__)


class TcpRelay:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False

    def listen(self, port: int = 0, netns: str | os.PathLike[str] | None = None) -> int:
        """Relay connections to 127.0.0.1:`port` (in `netns`, else here); returns the port."""
        if netns is not None:
            with in_netns(netns):
                ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        else:
            ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            ls.bind(("127.0.0.1", port))
            ls.listen(64)
        except OSError:
            ls.close()
            raise
        self._track(ls)
        threading.Thread(target=self._accept, args=(ls,), name="kpr-test-relay", daemon=True).start()
        port = ls.getsockname()[1]
        log.info("event=relay_listen port=%d netns=%s target=%s:%d", port, netns or "-", *self.target)
        return port

    def cut(self) -> None:
        """Close every listener and relayed connection."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            self._shut(s)
        log.info("event=relay_cut sockets=%d", len(socks))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.cut()

    def __enter__(self) -> "TcpRelay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            closed = self._closed
            if not closed:
                self._socks.extend(socks)
        if closed:
            for s in socks:
                self._shut(s)

    @staticmethod
    def _shut(s: socket.socket) -> None:
        # shutdown() wakes a thread blocked in accept() or recv() on it; close() alone does not.
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return
            try:
                # Made on this thread, so in the test process's own namespace.
                upstream = socket.create_connection(self.target, timeout=2)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self._track(client, upstream)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), name="kpr-test-relay-pump", daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._shut(src)
            self._shut(dst)
