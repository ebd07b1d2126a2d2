"""healthCheckNodePort for externalTrafficPolicy=Local services, as kube-proxy serves it.

External load balancers probe every node on the service's healthCheckNodePort: HTTP 200 with
a JSON body naming the service and the node's local endpoint count when the node has one,
503 otherwise, so they send traffic only to nodes that will not drop it. One small threaded
HTTP server per port, running exactly while a service with that port exists.

Listening sockets must live in the agent's network namespace whatever thread asks for them:
the plugin hands a `run_in_netns` callable that creates them there.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpr.model import ServiceKey

log = logging.getLogger(__name__)


@dataclass
class _Entry:
    key: ServiceKey
    local_endpoints: int


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # kube-proxy's checks are short; a stuck prober must not hold a thread for long
    request_queue_size = 64

    def __init__(self, addr: tuple[str, int], family: int, entry: _Entry) -> None:
        self.address_family = family
        self.entry = entry
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # one listener for both families when bound to "::"
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 5
    server_version = "kpr-healthcheck"
    sys_version = ""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        e = self.server.entry
        body = json.dumps(
            {
                "service": {"namespace": e.key.namespace, "name": e.key.name},
                "localEndpoints": e.local_endpoints,
                "serviceProxyHealthy": True,
            }
        ).encode()
        self.send_response(200 if e.local_endpoints > 0 else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("event=healthcheck_request client=%s %s", self.client_address[0], fmt % args)


class HealthChecks:
    """Listeners by port; `set()` creates or updates one, `remove()` closes it."""

    def __init__(self, run_in_netns: Callable[[Callable[[], Any]], Any], address: str = "") -> None:
        self._run_in_netns = run_in_netns
        self.address = address
        self._servers: dict[int, tuple[_Server, threading.Thread]] = {}
        self._lock = threading.Lock()
        self.errors: dict[int, str] = {}  # port -> why it could not listen (retried on the next set)

    def _listen(self, port: int, entry: _Entry) -> _Server:
        if self.address:
            fam = socket.AF_INET6 if ":" in self.address else socket.AF_INET
            return _Server((self.address, port), fam, entry)
        try:
            return _Server(("::", port), socket.AF_INET6, entry)
        except OSError as exc:
            if exc.errno not in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL: no IPv6 here
                raise
            return _Server(("0.0.0.0", port), socket.AF_INET, entry)

    def set(self, port: int, key: ServiceKey, local_endpoints: int) -> None:
        with self._lock:
            cur = self._servers.get(port)
            if cur is not None:
                server = cur[0]
                if server.entry.key != key:
                    log.warning("event=healthcheck_port_reassigned port=%d from=%s to=%s", port, server.entry.key, key)
                server.entry = _Entry(key, local_endpoints)
                return
            entry = _Entry(key, local_endpoints)
            try:
                server = self._run_in_netns(lambda: self._listen(port, entry))
            except OSError as exc:
                self.errors[port] = f"{key}: cannot listen on port {port}: {exc.strerror or exc}"
                log.error("event=healthcheck_listen_failed port=%d service=%s error=%s", port, key, exc)
                return
            self.errors.pop(port, None)
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": 0.2}, name=f"kpr-hc-{port}", daemon=True
            )
            thread.start()
            self._servers[port] = (server, thread)
            log.info("event=healthcheck_listening port=%d service=%s local_endpoints=%d", port, key, local_endpoints)

    def remove(self, port: int) -> None:
        with self._lock:
            self.errors.pop(port, None)
            cur = self._servers.pop(port, None)
        if cur is not None:
            server, thread = cur
            server.shutdown()
            server.server_close()
            thread.join(2)
            log.info("event=healthcheck_closed port=%d service=%s", port, server.entry.key)

    def ports(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {
                p: {"service": str(s.entry.key), "localEndpoints": s.entry.local_endpoints}
                for p, (s, _t) in sorted(self._servers.items())
            }

    def close(self) -> None:
        for port in list(self._servers):
            self.remove(port)
