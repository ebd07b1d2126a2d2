"""The local API: JSON over HTTP on a root-only unix socket, for the CLI.

GET /v1/status    agent, source and per-plugin status
GET /v1/services  one object per frontend (the shape of `kpr service list --json`); `state` is
                  "served", or "refused" with the `reason` a plugin gave (the service map
                  writer refuses a service that would not fit the maps)
GET /v1/plugins   the enabled plugins
GET /v1/datapath/services
                  one object per frontend as the pinned maps hold it (kpr.readback), named
                  after the desired state's rows; `kpr service list --datapath`. In both, a
                  backend's `state` is its state in that service (a pod port listed by several
                  services may be active in one and terminating in another)
/v1/status also carries "maps" when the service map writer runs: the kernel maps compared
with its accepted state (kpr.readback.differences), {"count": 0, ...} when in sync.

One request per connection (HTTP/1.0). At most MAX_CONNECTIONS are served at once; one more is
answered 503 and closed. A connection gets IO_TIMEOUT seconds for each read and write and
CONNECTION_DEADLINE seconds in all, so a client that sends nothing, sends slowly or reads
nothing is dropped and its thread freed. A client that hangs up is logged at debug level, one
line, never a traceback.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import Service

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


def refused_services(statuses: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Service ("namespace/name") -> why it is not served, from the plugins' status details
    ("refused", as the service map writer reports services that would not fit the maps)."""
    out: dict[str, str] = {}
    for st in statuses.values():
        refused = (st.get("details") or {}).get("refused")
        if isinstance(refused, dict):
            for key, reason in refused.items():
                out.setdefault(str(key), str(reason))
    return out


def frontend_rows(services: list[Service], refused: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One row per frontend; a service in `refused` (see refused_services) is marked so: it
    is in the desired state but not (or only in its last good state) in the maps."""
    refused = refused or {}
    rows = []
    for s in sorted(services, key=lambda s: s.key):
        key = str(s.key)
        reason = refused.get(key, "")
        for f in s.frontends:
            rows.append(
                {
                    "service": key,
                    "type": f.type.value,
                    "address": f.address,
                    "port": f.port,
                    "protocol": f.protocol.value,
                    "state": "refused" if reason else "served",
                    "reason": reason,
                    "backends": [{"address": b.address, "port": b.port, "state": b.state.value} for b in f.backends],
                }
            )
    return rows


def _writer(agent: "Agent") -> Any:
    """The service map writer facility, when a plugin asked for it."""
    return next((h.plugin for h in agent.handles if h.name == "servicemaps"), None)


# The comparison reads every service map under the writer's lock: at most once per this many
# seconds, however often `kpr status` is asked (a readiness probe runs it every few seconds).
MAPS_SYNC_MAX_AGE = 5.0
_maps_sync_cache: dict[int, tuple[float, dict[str, Any]]] = {}
_maps_sync_lock = threading.Lock()


def maps_sync(agent: "Agent") -> dict[str, Any] | None:
    """The kernel maps against the writer's accepted state (None without a writer), with
    "ageSeconds": how old the comparison is."""
    from .readback import differences

    writer = _writer(agent)
    if writer is None:
        return None
    with _maps_sync_lock:
        now = time.monotonic()
        cached = _maps_sync_cache.get(id(writer))
        if cached is None or now - cached[0] > MAPS_SYNC_MAX_AGE:
            try:
                result = differences(writer)
            except OSError as e:
                result = {"count": 0, "first": [], "maps": {}, "error": f"maps unreadable: {e}"}
            cached = _maps_sync_cache[id(writer)] = (now, result)
        return dict(cached[1], ageSeconds=round(now - cached[0], 1))


def status_with_maps(agent: "Agent") -> dict[str, Any]:
    """The agent's status, with "maps" (maps_sync) when there is a service map writer."""
    st = agent.status()
    sync = maps_sync(agent) if getattr(agent, "handles", None) else None
    return dict(st, maps=sync) if sync is not None else st


def datapath_rows(agent: "Agent") -> list[dict[str, Any]]:
    """What the pinned maps hold, one object per frontend, named after the desired state."""
    from .readback import DatapathMaps, join_services

    desired = frontend_rows(agent.store.snapshot(), refused_services(agent.plugin_statuses())) if agent.store else []
    with DatapathMaps(agent.config.bpf.pin_path) as dm:
        return join_services(dm.frontends(), desired)


MAX_CONNECTIONS = 16
IO_TIMEOUT = 5.0
CONNECTION_DEADLINE = 15.0

# What a client that goes away mid-request looks like from here: not the agent's problem.
_CLIENT_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError)

_BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b'Content-Length: 49\r\n\r\n{"error": "too many connections; try again soon"}'
)


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True
    # Room in the accept queue for bursts; what waits there costs no thread.
    request_queue_size = 64

    def __init__(self, path: str, handler: type, max_connections: int, deadline: float):
        super().__init__(path, handler)
        self.max_connections = max_connections
        self.deadline = deadline
        self._slots = threading.BoundedSemaphore(max_connections)
        self._lock = threading.Lock()
        # Connections being served -> when each must be done.
        self._active: dict[socket.socket, float] = {}
        self.refused = 0
        self.dropped = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            log.debug("api.busy connections=%d", self.max_connections)
            try:
                request.setblocking(False)
                request.send(_BUSY)  # fits any socket buffer; never waits on the client
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self._lock:
            self._active[request] = time.monotonic() + self.deadline
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release(request)

    def _release(self, request: socket.socket) -> None:
        with self._lock:
            if self._active.pop(request, None) is None:
                return
        self._slots.release()

    def active(self) -> int:
        with self._lock:
            return len(self._active)

    def reap(self) -> None:
        """Cut connections past their deadline: a client dripping a byte at a time never
        trips the per-read timeout, but it does trip this."""
        now = time.monotonic()
        with self._lock:
            late = [s for s, t in self._active.items() if t <= now]
        for s in late:
            self.dropped += 1
            log.debug("api.deadline connection dropped after %.0fs", self.deadline)
            try:
                s.shutdown(socket.SHUT_RDWR)  # the handler's blocked read or write returns
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, _CLIENT_GONE) or (isinstance(exc, OSError) and exc.errno in (errno.ENOTCONN, errno.EBADF)):
            log.debug("api.client_gone error=%s", exc)
            return
        # Not a client's doing: say what, without a traceback per connection.
        log.warning("api.connection_failed error=%s: %s", type(exc).__name__, exc)


class _Handler(BaseHTTPRequestHandler):
    agent: "Agent"
    # Each read and write of the connection (StreamRequestHandler sets it on the socket).
    timeout = IO_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        routes = {
            "/v1/status": lambda: status_with_maps(self.agent),
            "/v1/datapath/services": lambda: datapath_rows(self.agent),
            "/v1/services": lambda: frontend_rows(self.agent.store.snapshot(), refused_services(self.agent.plugin_statuses())),
            "/v1/plugins": lambda: [{"name": h.name, "dist": h.info.dist, "builtin": h.info.builtin} for h in self.agent.handles],
        }
        fn = routes.get(self.path)
        if fn is None:
            self._send(404, {"error": f"no such path {self.path[:100]}"})
            return
        try:
            body = fn()
        except Exception as e:  # an API bug must answer, not kill the agent
            log.exception("api.error path=%s", self.path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})
            return
        # Outside the try: a client gone by now is no API bug (handle_error says so quietly).
        self._send(200, body)

    def _send(self, code: int, body: Any) -> None:
        data = json.dumps(body, indent=None, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("api.request " + fmt, *args)


class ApiServer:
    def __init__(
        self,
        path: Path,
        agent: "Agent",
        max_connections: int = MAX_CONNECTIONS,
        io_timeout: float = IO_TIMEOUT,
        deadline: float = CONNECTION_DEADLINE,
    ):
        self.path = Path(path)
        handler = type("Handler", (_Handler,), {"agent": agent, "timeout": io_timeout})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale()
        old = os.umask(0o177)  # root-only from the moment the socket exists
        try:
            self._server = _Server(str(self.path), handler, max_connections, deadline)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._stop = threading.Event()
        self._reap_every = min(0.5, deadline / 4)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kpr-api", daemon=True)
        self._reaper = threading.Thread(target=self._reap, name="kpr-api-reaper", daemon=True)

    def _reap(self) -> None:
        while not self._stop.wait(self._reap_every):
            self._server.reap()

    def stats(self) -> dict[str, int]:
        """Connections being served, refused as over the bound, and cut at the deadline."""
        s = self._server
        return {"active": s.active(), "refused": s.refused, "dropped": s.dropped}

    def _remove_stale(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink()
            return
        finally:
            probe.close()
        raise RuntimeError(f"another kpr agent is serving {self.path}")

    def start(self) -> None:
        self._thread.start()
        self._reaper.start()
        log.info("api.listen socket=%s", self.path)

    def close(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ApiError(Exception):
    pass


def get(path: Path, route: str, timeout: float = 5.0) -> Any:
    """GET a route from the agent's socket; ApiError says plainly why it failed."""
    conn = _UnixConnection(str(path), timeout)
    try:
        try:
            conn.request("GET", route)
        except (BrokenPipeError, ConnectionResetError):
            # A busy agent answers 503 and closes before reading the request: the answer is
            # there to read.
            pass
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"null")
    except FileNotFoundError:
        raise ApiError(f"no agent socket at {path}: is `kpr run` running with this config?") from None
    except ConnectionRefusedError:
        raise ApiError(f"nothing listens on {path}: the agent is not running (stale socket)") from None
    except PermissionError:
        raise ApiError(f"permission denied on {path}: the API is root-only") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ApiError(f"talking to the agent at {path} failed: {e}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise ApiError(f"agent answered {resp.status}: {body}")
    return body
