"""The lb_ipam plugin: follows LoadBalancer Services through the source's StatusWriter,
decides their addresses (allocator.py) and writes them back to the source, from where they
reach every plugin (data path, announcers) as an ordinary service change.

All work happens on one worker thread: the source only queues its news here. With the
kubernetes source every node keeps the allocator current and only the node holding the
Lease writes (a newly elected node writes whatever differs, which is nothing when its
predecessor finished); with the files source every node writes its own copy.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from kpr import hookimpl
from kpr.context import PluginContext
from kpr.model import PluginStatus
from kpr.sources import LeaseSpec, StatusWriter

from .allocator import LbAllocator, Result
from .config import LbIpamConfig

log = logging.getLogger(__name__)

_STOP = object()


class LbIpam:
    def __init__(self) -> None:
        self.config: LbIpamConfig | None = None
        self.writer: StatusWriter | None = None
        self.allocator: LbAllocator | None = None
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._elected = False
        # Results not yet written (key -> result); retried while they fail.
        self._pending: dict[str, Result] = {}
        self.writes = 0
        self.write_errors = 0
        self.last_error = ""

    # --- hooks ---------------------------------------------------------------------------

    @hookimpl
    def kpr_config_schema(self) -> type[LbIpamConfig]:
        return LbIpamConfig

    @hookimpl
    def kpr_configure(self, config: LbIpamConfig, context: PluginContext) -> None:
        self.config = config
        if not config.pools:
            context.log.warning("lb_ipam.no_pools: no service will get an address (plugins.lb_ipam.pools is empty)")

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        assert self.config is not None
        self.start(context.status_writer())

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self.stop()

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        alloc = self.allocator
        if alloc is None:
            return PluginStatus(healthy=True, message="not started")
        with self._lock:
            results = dict(alloc.results)
            usage = alloc.usage()
            pending = len(self._pending)
        problems = {k: r.problem for k, r in sorted(results.items()) if r.problem}
        counters: dict[str, float] = {
            "services_allocated": sum(1 for r in results.values() if r.ips),
            "services_refused": len(problems),
            "writes": self.writes,
            "write_errors": self.write_errors,
            "writes_pending": pending,
            "elected": 1 if self._elected else 0,
        }
        for pool, u in usage.items():
            counters[f"pool_{pool}_used"] = u["used"]
            counters[f"pool_{pool}_free"] = u["free"]
            counters[f"pool_{pool}_waiting"] = u["waiting"]
        message = f"{counters['services_allocated']:.0f} services with addresses"
        if problems:
            message += f", {len(problems)} refused (see details.problems)"
        if self.last_error:
            message += f"; last write error: {self.last_error}"
        return PluginStatus(
            healthy=not self.last_error,
            message=message,
            counters=counters,
            details={"pools": usage, "problems": problems, "elected": self._elected},
        )

    # --- running -------------------------------------------------------------------------

    def start(self, writer: StatusWriter) -> None:
        assert self.config is not None
        self.writer = writer
        self.allocator = LbAllocator(self.config.pools, self.config.load_balancer_class, use_status=not writer.independent)
        self._thread = threading.Thread(target=self._run, name="kpr-lb-ipam", daemon=True)
        self._thread.start()
        writer.watch_services(lambda ups, dels: self._queue.put(("services", ups, dels)))
        lease = self.config.lease
        writer.elect(
            LeaseSpec(lease.namespace, lease.name, lease.duration, lease.retry_period),
            lambda elected: self._queue.put(("elected", elected)),
        )

    def stop(self) -> None:
        if self.writer is not None:
            self.writer.resign()
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=1.0 if self._pending else None)
            except queue.Empty:
                item = None  # retry what failed
            try:
                if item is _STOP:
                    return
                batch = [item] if item is not None else []
                # Take everything queued: one write per service for a burst of changes.
                while True:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        self._queue.put(_STOP)
                        break
                    batch.append(more)
                self._handle(batch)
            except Exception:
                log.exception("lb_ipam.worker_failed")

    def _handle(self, batch: list[Any]) -> None:
        assert self.allocator is not None
        for item in batch:
            if item[0] == "elected":
                self._elected = item[1]
                if item[1]:
                    # Newly elected: whatever differs from the services' status is written.
                    with self._lock:
                        self._pending.update(self.allocator.results)
                continue
            _, upserts, deletes = item
            with self._lock:
                changed = self.allocator.update(upserts, deletes)
            for key, res in changed.items():
                if res.problem:
                    log.warning("lb_ipam.refused service=%s reason=%s", key, res.problem)
                elif res.ips:
                    log.debug("lb_ipam.allocated service=%s ips=%s", key, ",".join(res.ips))
            if changed:
                log.info("lb_ipam.changed services=%d with_address=%d refused=%d", len(changed),
                         sum(1 for r in changed.values() if r.ips), sum(1 for r in changed.values() if r.problem))
            deleted = set(deletes)
            with self._lock:
                for key, res in changed.items():
                    if key in deleted and key not in self.allocator.requests:
                        self._pending.pop(key, None)
                    else:
                        self._pending[key] = res
        if self._elected:
            self._flush()
        else:
            # Not ours to write; a newly elected node writes every result anyway.
            with self._lock:
                self._pending.clear()

    def _flush(self) -> None:
        assert self.writer is not None
        with self._lock:
            pending = sorted(self._pending.items())
        for key, res in pending:
            # Not ours (any more) is a release: the source drops only what this plugin wrote
            # (the kubernetes source: a status carrying lb_ipam's condition).
            try:
                ok = self.writer.write_load_balancer(key, list(res.ips), res.problem)
            except Exception as e:
                self.write_errors += 1
                self.last_error = f"{key}: {e}"
                log.warning("lb_ipam.write_failed service=%s error=%s", key, e)
                if isinstance(e, RuntimeError):
                    continue  # the source answered about this service: the others may pass
                return  # the source cannot be reached: all wait for the retry

            if not ok:
                return  # no longer elected; the next one writes
            self.writes += 1
            with self._lock:
                if self._pending.get(key) is res:
                    del self._pending[key]
        with self._lock:
            if not self._pending:
                self.last_error = ""
