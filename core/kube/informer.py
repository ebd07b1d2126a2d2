"""List then watch one kind of object, for ever, as client-go's reflector does.

Not the `kubernetes` package's own SharedInformer: it lists without pagination, turns every
object into a typed model (seconds for 10k Services), reports every object of a relist as
MODIFIED (a flap for each service), waits a fixed 5 s after any error and cannot be stopped
while a watch is quiet. This one keeps the raw JSON the API server sent and leaves the
diffing to its handler, which holds the objects:

- the initial list is paginated (`limit`/`continue`); the watch starts from the list's
  resourceVersion with bookmarks, and resumes from the last resourceVersion seen (an
  event's or a bookmark's) when the stream ends or breaks;
- a resourceVersion too old for the server (HTTP 410, or an ERROR event with code 410)
  means a relist; the handler gets the whole list again and reconciles;
- failures back off exponentially with jitter, capped at `max_delay` so that changes flow
  again within seconds of the server answering; every request takes a token from the
  shared rate limiter first;
- a watch that sends nothing (no event, no bookmark) for `idle_timeout` is treated as
  broken: a server that stalls, or a connection that died without a FIN.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .client import RateLimiter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watched:
    """One kind to list and watch: the client call that lists it, and the selectors."""

    kind: str
    api_version: str
    # A generated client method such as CoreV1Api.list_service_for_all_namespaces.
    list_call: Callable[..., Any]
    label_selector: str | None = None
    field_selector: str | None = None


class Handler(Protocol):
    def listed(self, kind: str, items: list[dict], resource_version: str) -> None:
        """The whole current set of this kind (initial list, or a relist to reconcile)."""

    def event(self, kind: str, type_: str, obj: dict) -> None:
        """ADDED, MODIFIED or DELETED, with the whole object."""

    def failed(self, kind: str, reason: str) -> None:
        """A request for this kind failed; the informer is backing off."""

    def recovered(self, kind: str) -> None:
        """A request for this kind succeeded after failures."""


class JitterBackoff:
    """Exponential delays with full jitter in the upper half: spreads a fleet of nodes that
    lost the API server at the same moment, yet never waits longer than `maximum`."""

    def __init__(self, initial: float = 0.2, maximum: float = 3.0):
        self.initial = initial
        self.maximum = maximum

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * (2 ** max(0, attempt - 1)))
        return random.uniform(base / 2, base)


class _Expired(Exception):
    """The server no longer has our resourceVersion: relist."""


class _StreamError(Exception):
    pass


@dataclass
class InformerStats:
    events: dict[str, int] = field(default_factory=lambda: {"ADDED": 0, "MODIFIED": 0, "DELETED": 0, "BOOKMARK": 0})
    relists: int = 0
    watch_restarts: int = 0
    errors: int = 0
    state: str = "starting"  # starting | listing | watching | backoff | stopped
    resource_version: str = ""
    last_error: str = ""


def describe_error(exc: BaseException) -> str:
    """One line for a failed API request: "HTTP 500 InternalError: ...", or the connection
    problem ("NewConnectionError: Connection refused")."""
    status = getattr(exc, "status", None)
    if status is not None:
        reason = getattr(exc, "reason", "") or ""
        body = getattr(exc, "body", None)
        try:
            doc = json.loads(body) if body else {}
            if isinstance(doc, dict) and doc.get("message"):
                reason = f"{doc.get('reason') or reason}: {doc['message']}"
        except (ValueError, TypeError):
            pass
        return f"HTTP {status} {reason}".strip()
    text = str(exc) or type(exc).__name__
    # urllib3 wraps the interesting part ("Connection refused") deep in its message.
    for marker in ("Connection refused", "timed out", "Name or service not known", "CERTIFICATE_VERIFY_FAILED", "Connection reset"):
        if marker in text:
            return f"{type(exc).__name__}: {marker}"
    return f"{type(exc).__name__}: {text[:300]}"


class Informer:
    def __init__(
        self,
        watched: Watched,
        handler: Handler,
        limiter: RateLimiter,
        *,
        page_size: int = 500,
        backoff: JitterBackoff | None = None,
        watch_timeout: tuple[int, int] = (240, 480),
        idle_timeout: float = 120.0,
        connect_timeout: float = 5.0,
    ):
        self.watched = watched
        self.handler = handler
        self.limiter = limiter
        self.page_size = page_size
        self.backoff = backoff or JitterBackoff()
        self.watch_timeout = watch_timeout
        self.idle_timeout = idle_timeout
        self.connect_timeout = connect_timeout
        self.stats = InformerStats()
        self._rv: str | None = None
        self._listed_once = False
        self._failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp: Any = None
        self._resp_lock = threading.Lock()

    @property
    def kind(self) -> str:
        return self.watched.kind

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"kpr-kube-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._abort_stream()

    def join(self, timeout: float) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def _abort_stream(self) -> None:
        # Unblocks a read waiting on a quiet watch from another thread.
        with self._resp_lock:
            resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()
            except Exception:
                pass
            try:
                resp.close()
            except Exception:
                pass

    # --- the loop ------------------------------------------------------------------------

    def _selectors(self) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if self.watched.label_selector:
            kw["label_selector"] = self.watched.label_selector
        if self.watched.field_selector:
            kw["field_selector"] = self.watched.field_selector
        return kw

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self._rv is None:
                    self._list()
                self._watch()
            except _Expired:
                log.info("kube.expired kind=%s resource_version=%s: relisting", self.kind, self._rv)
                self._rv = None
            except Exception as e:  # noqa: BLE001 - any failure: report, back off, go on
                if self._stop.is_set():
                    break
                self._fail(e)
        self.stats.state = "stopped"

    def _fail(self, exc: BaseException) -> None:
        self._failures += 1
        self.stats.errors += 1
        reason = f"{self.stats.state} {self.kind}: {describe_error(exc)}"
        self.stats.last_error = reason
        delay = self.backoff.delay(self._failures)
        log.warning("kube.error kind=%s reason=%s retry_in=%.2f", self.kind, reason, delay)
        self.stats.state = "backoff"
        try:
            self.handler.failed(self.kind, reason)
        except Exception:
            log.exception("kube.handler_failed kind=%s", self.kind)
        self._stop.wait(delay)

    def _succeeded(self) -> None:
        if self._failures:
            self._failures = 0
            log.info("kube.recovered kind=%s", self.kind)
            self.handler.recovered(self.kind)

    def _complete(self, obj: dict) -> dict:
        # List items come without kind and apiVersion; the store needs both.
        if "kind" not in obj:
            obj["kind"] = self.watched.kind
        if "apiVersion" not in obj:
            obj["apiVersion"] = self.watched.api_version
        return obj

    def _request(self, **kw: Any) -> Any:
        if not self.limiter.wait(self._stop):
            raise _StreamError("stopping")
        return self.watched.list_call(**self._selectors(), **kw, _preload_content=False)

    def _list(self) -> None:
        self.stats.state = "listing"
        items: list[dict] = []
        token: str | None = None
        rv = ""
        while True:
            kw: dict[str, Any] = {"limit": self.page_size, "_request_timeout": (self.connect_timeout, 60)}
            if token:
                kw["_continue"] = token
            try:
                resp = self._request(**kw)
            except Exception as e:
                if getattr(e, "status", None) == 410 and token:
                    # The snapshot behind the continue token is gone: start the list again.
                    log.info("kube.list_expired kind=%s: restarting the list", self.kind)
                    items, token = [], None
                    continue
                raise
            try:
                doc = json.loads(resp.data)
            finally:
                resp.release_conn()
            if not isinstance(doc, dict) or not isinstance(doc.get("items", []), list):
                raise _StreamError(f"list {self.kind}: the answer is not a list object")
            meta = doc.get("metadata") or {}
            items.extend(self._complete(o) for o in (doc.get("items") or []) if isinstance(o, dict))
            rv = str(meta.get("resourceVersion") or rv)
            token = meta.get("continue") or None
            if not token:
                break
            if self._stop.is_set():
                raise _StreamError("stopping")
        if self._listed_once:
            self.stats.relists += 1
        self._listed_once = True
        self._rv = rv or "0"
        self.stats.resource_version = self._rv
        self._succeeded()
        self.handler.listed(self.kind, items, self._rv)

    def _watch(self) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        self.stats.state = "watching"
        lo, hi = self.watch_timeout
        resp = self._request(
            watch=True,
            resource_version=self._rv,
            allow_watch_bookmarks=True,
            timeout_seconds=random.randint(lo, hi),
            _request_timeout=(self.connect_timeout, self.idle_timeout),
        )
        with self._resp_lock:
            self._resp = resp
        if self._stop.is_set():
            self._abort_stream()
        opened = time.monotonic()
        lines = 0
        try:
            self._succeeded()
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    return
                if not line:
                    continue
                lines += 1
                self._on_line(line)
        finally:
            with self._resp_lock:
                self._resp = None
            try:
                resp.release_conn()
            except Exception:
                pass
        self.stats.watch_restarts += 1
        if not lines and time.monotonic() - opened < 1.0:
            # Closed at once without a word: a proxy or a server in trouble. Back off rather
            # than spin on reconnects.
            raise _StreamError(f"watch {self.kind}: closed by the server at once")
        # Otherwise the server ended the watch (its timeout, a restart): watch again from
        # where we are, at once.

    def _on_line(self, line: str) -> None:
        try:
            ev = json.loads(line)
        except ValueError:
            raise _StreamError(f"watch {self.kind}: an event that is not JSON: {line[:120]!r}") from None
        if not isinstance(ev, dict) or not isinstance(ev.get("object"), dict):
            raise _StreamError(f"watch {self.kind}: an event without an object: {line[:120]!r}")
        type_, obj = ev.get("type"), ev["object"]
        if type_ == "ERROR":
            if obj.get("code") == 410:
                raise _Expired()
            raise _StreamError(f"watch {self.kind}: ERROR event: {obj.get('reason', '')} {obj.get('message', '')}".strip())
        meta = obj.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if type_ not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise _StreamError(f"watch {self.kind}: unknown event type {type_!r}")
        self.stats.events[type_] += 1
        if rv:
            self._rv = str(rv)
            self.stats.resource_version = self._rv
        if type_ == "BOOKMARK":
            return
        try:
            self.handler.event(self.kind, type_, self._complete(obj))
        except Exception:
            # One object the handler chokes on must not stop the stream (nor, resumed from
            # before it, replay it for ever): count it, log it, go on.
            self.stats.errors += 1
            log.exception("kube.handler_failed kind=%s type=%s", self.kind, type_)
