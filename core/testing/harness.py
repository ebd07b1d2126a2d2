"""Run one plugin (or a few) as the agent would, against a real service map writer.

`PluginHarness` is the part of the agent a plugin test needs, without a source:

    from kpr.model import NodeInfo
    from kpr.testing.harness import plugin_harness

    with plugin_harness("myplugin", NodeInfo("node1", addresses=("10.0.0.1",))) as h:
        plugin = h.start(MyPlugin(), {"someKey": 1}, name="myplugin")
        h.apply(service)            # through the agent's bus: the writer first, then every plugin
        ...                         # read the maps (h.writer.read_back()), the plugin's status
        h.delete(service.key)

- `start(plugin, section, name=...)` validates `section` with the plugin's own
  `kpr_config_schema`, builds its PluginContext (`plugin_context`: the agent config's
  bpf.pinPath and agent.stateDir point into the harness's scratch pin directory) and calls
  `kpr_configure` and `kpr_start`, inside a network namespace when one is given (the agent
  runs in the node's). The core facilities the plugin asks for with `kpr_requires` are the
  agent's own (kpr.pluginmanager.FACILITIES: the NodePort facility...), started first, in
  the same namespace, with the plugin's section among the config's plugin sections, and
  given the services applied so far (in an agent a facility starts before any service
  flows); "servicemaps" is the harness's writer.
- `apply(service)` / `delete(key)` / `node_changed(node)` / `sync_complete()` go through
  the agent's event bus in its synchronous mode (kpr.bus.EventBus(synchronous=True)): the
  writer stage (kpr.pipeline.WriterStage) applies the change to the maps first, then every
  facility and plugin gets it through its hooks as pluggy calls them in the agent (only
  @hookimpl methods, only the arguments they name, `generation` the maps now hold), facilities
  first, then plugins in start order; an exception is raised to the caller.
  `feed(*objects)` takes Kubernetes objects through the agent's own ObjectStore (translated
  for the harness's node) and dispatches each model change the same way.
- `stop(plugin)` calls `kpr_stop`, then stops a facility no running plugin needs any more
  (as an agent stops its facilities after its plugins); leaving the context stops every
  plugin and facility still running and closes the writer the harness opened.

The writer's initial state is written (empty) when the harness takes it: services applied
afterwards reach the maps at once, as in an agent after its first sync. `writer=False` runs
without maps (a plugin that does not ask for them, tests without root).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kpr.config import KprConfig
from kpr.context import PluginContext
from kpr.model import NodeInfo, Service, ServiceKey

__all__ = ["PluginHarness", "plugin_context", "plugin_harness", "start_plugin", "validate_section"]


def plugin_context(
    name: str,
    node: NodeInfo,
    pin: Path | None = None,
    *,
    state_dir: Path | None = None,
    config: Mapping[str, Any] | None = None,
) -> PluginContext:
    """The PluginContext the agent would give plugin `name` on `node`: the agent config's
    bpf.pinPath is `pin`, agent.stateDir and the plugin's own state directory `state_dir`
    (default: `pin`); `config` adds other top-level keys of the agent config."""
    doc: dict[str, Any] = dict(config or {})
    state = state_dir or pin
    if pin is not None:
        doc.setdefault("bpf", {"pinPath": str(pin)})
    if state is not None:
        doc.setdefault("agent", {"stateDir": str(state)})
    return PluginContext(
        name=name,
        node=node,
        log=logging.getLogger(f"kpr.plugins.{name}"),
        config=KprConfig.model_validate(doc),
        state_dir=Path(state) if state is not None else Path("."),
    )


def validate_section(plugin: Any, section: Any) -> Any:
    """`section` (a dict of camelCase keys, as in kpr.yaml, `enabled` allowed) validated
    with the plugin's kpr_config_schema; a model passes through."""
    if not isinstance(section, Mapping):
        return section
    schema = getattr(plugin, "kpr_config_schema", None)
    data = {k: v for k, v in section.items() if k != "enabled"}
    if schema is None:
        return data
    return schema().model_validate(data)


def start_plugin(plugin: Any, section: Any, context: PluginContext, *, netns: Any = None) -> Any:
    """kpr_configure and kpr_start, as the agent calls them; in `netns` (a Namespace, a name
    or a path) when given. Returns the plugin."""
    from kpr.testing.netns import in_netns

    # a plugin without one of the two is not called for it, as in the agent
    if hasattr(plugin, "kpr_configure"):
        plugin.kpr_configure(config=validate_section(plugin, section), context=context)
    ns = getattr(netns, "path", netns)
    if hasattr(plugin, "kpr_start"):
        with in_netns(ns) if ns is not None else contextlib.nullcontext():
            plugin.kpr_start(context=context)
    return plugin


class PluginHarness:
    """Plugins, the facilities they need and a service map writer on one node; see the module docstring."""

    def __init__(self, node: NodeInfo, pin: Path | None = None, *, writer: Any = None, netns: Any = None) -> None:
        from kpr.bus import EventBus

        self.node = node
        self.pin = pin
        self.netns = netns
        self.writer: Any = None
        self._own_writer = False
        # The agent's bus, synchronous: never started (start() only starts threads), so
        # plugins can come and go between dispatches.
        self.bus = EventBus(synchronous=True)
        self.plugins: list[Any] = []
        self.contexts: dict[int, PluginContext] = {}
        # Running core facilities by name, and the plugins (ids) that required each.
        self.facilities: dict[str, Any] = {}
        self._users: dict[str, set[int]] = {}
        self._workers: dict[int, str] = {}  # id(plugin or facility) -> its worker's name on the bus
        self.applied: dict[ServiceKey, Service] = {}
        self._synced = False
        self.store: Any = None
        if writer is not None:
            self.use_writer(writer)

    @property
    def generation(self) -> int:
        """The generation the maps hold, as the writer stage hands it to plugins (0 without a writer)."""
        return self.bus.stage.generation if self.bus.stage is not None else 0

    def use_writer(self, writer: Any) -> Any:
        """Put `writer` (an open ServiceMapWriter; the caller closes it) in front of the plugins,
        as the agent's writer stage. A writer whose initial state is not written yet gets it
        now, empty: what its maps held from before goes, as at an agent's first sync."""
        from kpr.pipeline import WRITER_FACILITY

        assert self.writer is None and not self.plugins, "the writer comes before any plugin"
        self.writer = writer
        self.bus.set_writer(WRITER_FACILITY, writer)
        if not writer.initial_written:
            self.bus.sync_complete()  # no plugin on the bus yet: the writer's alone
        return writer

    def open_writer(self) -> Any:
        """Open the service map writer on the pin directory (kpr's shared service maps); the
        harness closes it."""
        from kpr.servicemaps import ServiceMapWriter

        assert self.pin is not None, "a writer needs a pin directory"
        self.use_writer(ServiceMapWriter(self.pin).open())
        self._own_writer = True
        return self.writer

    # -- plugins
    def start(self, plugin: Any, section: Any = None, *, name: str, netns: Any = None,
              state_dir: Path | None = None, node: NodeInfo | None = None) -> Any:
        """Configure and start `plugin` as `name` (its config section's name), after the core
        facilities it requires; `node`: this plugin's node facts when not the harness's (an
        agent restarted with other devices)."""
        ctx = plugin_context(name, node or self.node, self.pin, state_dir=state_dir)
        config = validate_section(plugin, section or {})
        ns = netns if netns is not None else self.netns
        required = self._require(plugin, name, config, ctx.node, ns)
        try:
            start_plugin(plugin, config, ctx, netns=ns)
        except BaseException:
            self._release(plugin, required)
            raise
        self.plugins.append(plugin)
        self.contexts[id(plugin)] = ctx
        self._add_worker(plugin, name)
        return plugin

    def context(self, plugin: Any) -> PluginContext:
        return self.contexts[id(plugin)]

    def stop(self, plugin: Any) -> None:
        """kpr_stop, as the agent stops a plugin; then the facilities no running plugin needs."""
        ctx = self.forget(plugin)
        try:
            if hasattr(plugin, "kpr_stop"):
                plugin.kpr_stop(context=ctx)
        finally:
            self._release(plugin, list(self._users))

    def forget(self, plugin: Any) -> PluginContext:
        """Take `plugin` off the bus without stopping it (what a killed agent's plugin gets);
        returns its context. Its facilities keep running until `stop` of another or `close`."""
        self.plugins.remove(plugin)
        self.bus.workers.pop(self._workers.pop(id(plugin)), None)
        return self.contexts.pop(id(plugin))

    @contextlib.contextmanager
    def only(self, *plugins: Any) -> Iterator[None]:
        """Dispatch to these plugins (and the facilities) alone for the block: the others, still
        running, miss what happens meanwhile (a test of two instances sharing state)."""
        saved = dict(self.bus.workers)
        keep = {self._workers[id(o)] for o in (*plugins, *self.facilities.values())}
        self.bus.workers = {n: w for n, w in saved.items() if n in keep}
        try:
            yield
        finally:
            live = set(self._workers.values())  # not a plugin stopped in the block
            self.bus.workers = {n: w for n, w in {**saved, **self.bus.workers}.items() if n in live}

    # -- facilities
    def _require(self, plugin: Any, name: str, section: Any, node: NodeInfo, ns: Any) -> list[str]:
        """Start the core facilities `plugin` asks for that are not running; returns their names."""
        from kpr.pipeline import WRITER_FACILITY
        from kpr.pluginmanager import FACILITIES

        wanted = list(getattr(plugin, "kpr_requires", lambda: [])() or [])
        for fac in wanted:
            if fac == WRITER_FACILITY:
                if self.writer is None:
                    raise ValueError(f"plugin {name} requires {fac!r}: give the harness a writer (writer=True)")
                continue
            if fac not in FACILITIES:
                raise ValueError(f"plugin {name} requires {fac!r}, which kpr does not provide "
                                 f"(known: {', '.join(sorted(FACILITIES))})")
            if fac not in self.facilities:
                self._start_facility(fac, FACILITIES[fac], name, section, node, ns)
            self._users.setdefault(fac, set()).add(id(plugin))
        return [f for f in wanted if f in self.facilities]

    def _start_facility(self, fac: str, factory: Any, user: str, section: Any, node: NodeInfo, ns: Any) -> None:
        ctx = plugin_context(fac, node, self.pin)
        # what the plugin manager gives a facility: the sections of the plugins that require it
        ctx.config.plugin_sections[user] = section
        obj = factory(ctx.config)
        start_plugin(obj, None, ctx, netns=ns)
        self.facilities[fac] = obj
        self.contexts[id(obj)] = ctx
        call = self._add_worker(obj, fac)
        # In an agent a facility starts before any service flows: it gets what was applied.
        for svc in self.applied.values():
            call("kpr_service_upsert", service=svc, generation=self.generation)
        if self._synced:
            call("kpr_sync_complete", generation=self.generation)

    def _release(self, plugin: Any, names: list[str]) -> None:
        for fac in names:
            users = self._users.get(fac)
            if users is None:
                continue
            users.discard(id(plugin))
            if not users:
                self._stop_facility(fac)

    def _stop_facility(self, fac: str) -> None:
        obj = self.facilities.pop(fac)
        del self._users[fac]
        self.bus.workers.pop(self._workers.pop(id(obj)), None)
        ctx = self.contexts.pop(id(obj))
        if hasattr(obj, "kpr_stop"):
            obj.kpr_stop(context=ctx)

    def _add_worker(self, obj: Any, name: str) -> Any:
        """`obj` on the bus as the agent has it: its own worker calling its hooks through pluggy,
        facilities' workers ahead of the plugins' (they are registered first in an agent).
        Returns the hook caller."""
        from kpr.pluginmanager import hook_caller

        worker = name if name not in self.bus.workers else f"{name}#{len(self._workers)}"
        self._workers[id(obj)] = worker
        call = hook_caller(obj, worker)
        self.bus.add_plugin(worker, call)
        first = {self._workers[id(f)] for f in self.facilities.values() if id(f) in self._workers}
        self.bus.workers = dict(sorted(self.bus.workers.items(), key=lambda kv: kv[0] not in first))
        return call

    # -- dispatch
    def apply(self, svc: Service) -> None:
        """One bus dispatch of a changed service: the writer, then every facility and plugin."""
        self.bus.upsert(svc)
        self.applied[svc.key] = svc

    def delete(self, key: ServiceKey) -> None:
        self.bus.delete(key)
        self.applied.pop(key, None)

    def node_changed(self, node: NodeInfo) -> None:
        """New node facts, as the agent hands them on: every context's node, then the bus (a
        barrier: facilities and plugins get it before anything dispatched later)."""
        self.node = node
        for ctx in self.contexts.values():
            ctx.node = node
        self.bus.node_changed(node)

    def sync_complete(self) -> None:
        self.bus.sync_complete()
        self._synced = True

    def feed(self, *objs: dict, gone: Iterable[Any] = ()) -> None:
        """Kubernetes objects in and `gone` ObjectRefs out of the agent's ObjectStore for this
        node; each model change it publishes is one `apply` or `delete`."""
        if self.store is None:
            from kpr.store import ObjectStore

            publisher = SimpleNamespace(upsert=self.apply, delete=self.delete, sync_complete=lambda: None)
            self.store = ObjectStore(self.node, publisher)
        self.store.apply(list(objs), list(gone))

    def clear(self) -> None:
        """Delete every service applied, and forget the objects fed."""
        self.store = None
        for key in list(self.applied):
            self.delete(key)

    def close(self) -> None:
        """Stop every plugin still running, then every facility (errors logged, the rest still
        stopped); close the writer the harness opened."""
        log = logging.getLogger(__name__)
        try:
            for p in reversed(list(self.plugins)):
                try:
                    self.stop(p)
                except Exception:
                    log.exception("event=harness_stop_failed plugin=%s", type(p).__name__)
            for fac in reversed(list(self.facilities)):
                try:
                    self._stop_facility(fac)
                except Exception:
                    log.exception("event=harness_stop_failed facility=%s", fac)
        finally:
            if self.writer is not None and self._own_writer:
                self.writer.close()

    def __enter__(self) -> "PluginHarness":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def plugin_harness(prefix: str, node: NodeInfo, *, writer: bool = True, netns: Any = None) -> Iterator[PluginHarness]:
    """A PluginHarness on a scratch pin directory (unique per run, named after `prefix`) with
    the service map writer open; everything stopped, detached and removed afterwards.
    writer=False: no pin directory, no maps (needs no root)."""
    if not writer:
        with PluginHarness(node, netns=netns) as h:
            yield h
        return
    from kpr.testing.bpffs import scratch_pin_dir

    with scratch_pin_dir(prefix) as pin, PluginHarness(node, pin, netns=netns) as h:
        h.open_writer()
        yield h
