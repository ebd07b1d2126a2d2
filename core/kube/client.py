"""The connection to the API server, built from the `source` section.

Three ways in, first match wins: a direct address (`source.apiServer`, with `tokenFile` and
`caFile`), because the `kubernetes` ClusterIP is not reachable before kpr itself serves it;
a kubeconfig (`source.kubeconfig`, optional `context`); the in-cluster service account
(KUBERNETES_SERVICE_HOST/PORT with the projected token and the cluster CA). TLS is always
verified: a kubeconfig that asks to skip verification is refused rather than obeyed.

The token is read again whenever its file changes, because projected service-account tokens
rotate (about hourly) and the old one stops working. The `kubernetes` client's own retries
are off: callers back off with jitter themselves and must see failures at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from ..config import SourceSection

log = logging.getLogger(__name__)


class KubeConfigError(Exception):
    """The source section cannot give a usable connection; the message says why."""


class RateLimiter:
    """A token bucket, as client-go's: `burst` requests at once, then `qps` per second."""

    def __init__(self, qps: float, burst: int):
        self.qps = qps
        self.burst = burst
        self._tokens = float(burst)
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Take a token, sleeping as long as needed; False if `stop` was set meanwhile."""
        while True:
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.qps)
                self._at = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return True
                delay = (1 - self._tokens) / self.qps
            if stop is not None:
                if stop.wait(delay):
                    return False
            else:
                time.sleep(delay)


class _TokenFile:
    """Feeds the client the file's current token; re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._sig: tuple[int, int, int] | None = None
        self.token = ""
        self.rotations = 0
        # Every informer's thread calls refresh() before its requests: without the lock two of
        # them saw the same new file and counted one rotation twice.
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> str:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise KubeConfigError(f"cannot read the token file {self.path}: {e.strerror}") from None
        sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        if sig == self._sig:
            return self.token
        with self._lock:
            if sig != self._sig:
                self._reload(sig)
            return self.token

    def _reload(self, sig: tuple[int, int, int]) -> None:
        token = self.path.read_text().strip()
        if not token:
            raise KubeConfigError(f"the token file {self.path} is empty")
        if self.token and token != self.token:
            self.rotations += 1
            log.info("kube.token_rotated path=%s", self.path)
        # The token before the signature: a thread that finds the new signature without the
        # lock must find the new token with it.
        self.token = token
        self._sig = sig

    def hook(self, configuration) -> None:
        # Called by the kubernetes client before every request: a stat, and a read only
        # when the file changed. A token file gone missing keeps the last token (the next
        # 401 shows the problem) rather than failing inside the client.
        try:
            configuration.api_key["BearerToken"] = self.refresh()
        except (KubeConfigError, OSError) as e:
            log.warning("kube.token_unreadable error=%s", e)


@dataclass
class Connection:
    """An ApiClient and how it was made, for status and logs."""

    client: "ApiClient"
    server: str
    how: str
    tokens: _TokenFile | None = None

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass


def _token_config(host: str, token_file: Path, ca_file: Path):
    from kubernetes.client import Configuration

    if not Path(ca_file).is_file():
        raise KubeConfigError(f"no CA file at {ca_file}: kpr verifies the API server's certificate (set source.caFile)")
    tokens = _TokenFile(token_file)
    cfg = Configuration(host=host)
    cfg.ssl_ca_cert = str(ca_file)
    cfg.verify_ssl = True
    cfg.api_key = {"BearerToken": tokens.token}
    cfg.api_key_prefix = {"BearerToken": "Bearer"}
    cfg.refresh_api_key_hook = tokens.hook
    return cfg, tokens


def connect(section: "SourceSection", *, user_agent: str = "kpr") -> Connection:
    """A connection as the source section describes; raises KubeConfigError naming the key."""
    try:
        from kubernetes import config as kconfig
        from kubernetes.client import ApiClient, Configuration
    except ImportError:
        raise KubeConfigError("source.kind kubernetes needs the kubernetes package: pip install 'kpr[kubernetes]'") from None

    tokens = None
    if section.api_server:
        cfg, tokens = _token_config(section.api_server, section.token_file, section.ca_file)
        how = "apiServer"
    elif section.kubeconfig:
        path = Path(section.kubeconfig)
        if not path.is_file():
            raise KubeConfigError(f"source.kubeconfig: no such file: {path}")
        cfg = Configuration()
        try:
            kconfig.load_kube_config(
                config_file=str(path), context=section.context or None, client_configuration=cfg, persist_config=False
            )
        except Exception as e:  # the loader raises ConfigException, ValueError, KeyError...
            raise KubeConfigError(f"source.kubeconfig {path}: {e}") from None
        if not cfg.verify_ssl:
            raise KubeConfigError(f"source.kubeconfig {path}: the cluster sets insecure-skip-tls-verify; kpr always verifies TLS (give it the CA)")
        how = f"kubeconfig {path}" + (f" context {section.context}" if section.context else "")
    else:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise KubeConfigError(
                "source.kind kubernetes: no way to reach the API server: set source.apiServer or "
                "source.kubeconfig, or run in a pod (KUBERNETES_SERVICE_HOST is not set)"
            )
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        cfg, tokens = _token_config(f"https://{host}:{port}", section.token_file, section.ca_file)
        how = "in-cluster"
    # We back off ourselves, with jitter; urllib3's retries would hide an outage for seconds.
    cfg.retries = False
    client = ApiClient(configuration=cfg)
    client.user_agent = user_agent
    log.info("kube.connect server=%s how=%s", cfg.host, how)
    return Connection(client=client, server=cfg.host, how=how, tokens=tokens)


# The generated clients' keyword names for list/watch, and the query parameter each is.
_QUERY = {
    "label_selector": "labelSelector",
    "field_selector": "fieldSelector",
    "limit": "limit",
    "_continue": "continue",
    "watch": "watch",
    "resource_version": "resourceVersion",
    "allow_watch_bookmarks": "allowWatchBookmarks",
    "timeout_seconds": "timeoutSeconds",
}


def raw_lister(client: "ApiClient", path: str) -> Callable[..., Any]:
    """A list/watch call for `path` taking the generated methods' keywords
    (label_selector, limit, _continue, watch, ..., _request_timeout) and returning the raw
    urllib3 response; non-2xx answers raise ApiException as the generated methods do.

    Used instead of CoreV1Api & co. because importing those builds hundreds of pydantic
    models (about half a second of an agent's start) for objects kpr reads as plain JSON."""
    from kubernetes.client.exceptions import ApiException

    def call(**kw: Any) -> Any:
        timeout = kw.pop("_request_timeout", None)
        kw.pop("_preload_content", None)
        query = []
        for key, value in kw.items():
            if value is None:
                continue
            if key not in _QUERY:
                raise TypeError(f"unknown list parameter {key!r}")
            query.append((_QUERY[key], str(value).lower() if isinstance(value, bool) else value))
        req = client.param_serialize(
            method="GET", resource_path=path, query_params=query,
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"],
        )
        resp = client.call_api(*req, _request_timeout=timeout)
        if not 200 <= resp.status <= 299:
            resp.read()
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp.response

    call.__name__ = f"list {path}"
    return call



def json_call(method: Callable[..., Any], *args: Any, timeout: float = 10.0) -> tuple[int, Any]:
    """Call a `kubernetes` client method (CoreV1Api().patch_namespaced_service_status, ...)
    and return (HTTP status, the answer as plain JSON, or None). Errors the API server
    answers are returned, not raised: callers such as a Lease election act on 404 and 409.
    The answer is not turned into the client's model objects, which kpr never uses."""
    import json

    from kubernetes.client.exceptions import ApiException

    try:
        resp = method(*args, _preload_content=False, _request_timeout=(min(2.0, timeout), timeout))
    except ApiException as e:
        return e.status or 0, None
    try:
        return resp.status, json.loads(resp.data) if resp.data else None
    except ValueError:
        return resp.status, None
