"""The local API: JSON over HTTP on a root-only unix socket, for the CLI.

GET /v1/status    agent, source and per-plugin status
GET /v1/services  one object per frontend (the shape of `kpr service list --json`)
GET /v1/plugins   the enabled plugins
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .model import Service

if TYPE_CHECKING:
    from .daemon import Agent

log = logging.getLogger(__name__)


def frontend_rows(services: list[Service]) -> list[dict[str, Any]]:
    rows = []
    for s in sorted(services, key=lambda s: s.key):
        for f in s.frontends:
            rows.append(
                {
                    "service": str(s.key),
                    "type": f.type.value,
                    "address": f.address,
                    "port": f.port,
                    "protocol": f.protocol.value,
                    "backends": [{"address": b.address, "port": b.port, "state": b.state.value} for b in f.backends],
                }
            )
    return rows


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = True


class _Handler(BaseHTTPRequestHandler):
    agent: "Agent"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        routes = {
            "/v1/status": lambda: self.agent.status(),
            "/v1/services": lambda: frontend_rows(self.agent.store.snapshot()),
            "/v1/plugins": lambda: [{"name": h.name, "dist": h.info.dist, "builtin": h.info.builtin} for h in self.agent.handles],
        }
        fn = routes.get(self.path)
        if fn is None:
            self._send(404, {"error": f"no such path {self.path}"})
            return
        try:
            self._send(200, fn())
        except Exception as e:  # an API bug must answer, not kill the agent
            log.exception("api.error path=%s", self.path)
            self._send(500, {"error": f"{type(e).__name__}: {e}"})

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
    def __init__(self, path: Path, agent: "Agent"):
        self.path = Path(path)
        handler = type("Handler", (_Handler,), {"agent": agent})
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.exists() or self.path.is_symlink():
            self._remove_stale()
        old = os.umask(0o177)  # root-only from the moment the socket exists
        try:
            self._server = _Server(str(self.path), handler)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._thread = threading.Thread(target=self._server.serve_forever, name="kpr-api", daemon=True)

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
        log.info("api.listen socket=%s", self.path)

    def close(self) -> None:
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
        conn.request("GET", route)
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
