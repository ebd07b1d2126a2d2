"""Run one plugin (or a few) as the agent would, against a real service map writer.

`PluginHarness` is the part of the agent a plugin test needs, without a source or a bus:

    from kpr.model import NodeInfo
    from kpr.testing.harness import plugin_harness

    with plugin_harness("myplugin", NodeInfo("node1", addresses=("10.0.0.1",))) as h:
        plugin = h.start(MyPlugin(), {"someKey": 1}, name="myplugin")
        h.apply(service)            # the writer first, then every plugin: the bus's order
        ...                         # read the maps (h.writer.read_back()), the plugin's status
        h.delete(service.key)

- `start(plugin, section, name=...)` validates `section` with the plugin's own
  `kpr_config_schema`, builds its PluginContext (`plugin_context`: the agent config's
  bpf.pinPath and agent.stateDir point into the harness's scratch pin directory) and calls
  `kpr_configure` and `kpr_start`, inside a network namespace when one is given (the agent
  runs in the node's).
- `apply(service)` / `delete(key)` are one dispatch each: the writer's upsert/delete, then
  `kpr_service_upsert` / `kpr_service_delete` on each started plugin, in start order (with
  `generation`, one more per change written, to hooks that take it).
  `feed(*objects)` takes Kubernetes objects through the agent's own ObjectStore (translated
  for the harness's node) and dispatches each model change the same way.
- `stop(plugin)` calls `kpr_stop`; leaving the context stops every plugin still running
  and closes the writer; `plugin_harness` also removes the scratch pin directory.

`writer=False` runs without maps (a plugin that does not ask for them, tests without root).
"""

from __future__ import annotations

import contextlib
import inspect
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

    plugin.kpr_configure(config=validate_section(plugin, section), context=context)
    ns = getattr(netns, "path", netns)
    with in_netns(ns) if ns is not None else contextlib.nullcontext():
        plugin.kpr_start(context=context)
    return plugin


class PluginHarness:
    """Plugins and a service map writer on one node; see the module docstring."""

    def __init__(self, node: NodeInfo, pin: Path | None = None, *, writer: Any = None, netns: Any = None) -> None:
        self.node = node
        self.pin = pin
        self.netns = netns
        self.writer = writer
        self.plugins: list[Any] = []
        self.contexts: dict[int, PluginContext] = {}
        self.applied: dict[ServiceKey, Service] = {}
        self.store: Any = None
        # What the bus's writer stage hands the plugins: one more per change written (0 without a writer).
        self.generation = 0

    def open_writer(self) -> Any:
        """Open the service map writer on the pin directory (kpr's shared service maps)."""
        from kpr.servicemaps import ServiceMapWriter

        assert self.pin is not None, "a writer needs a pin directory"
        self.writer = ServiceMapWriter(self.pin).open()
        return self.writer

    # -- plugins
    def start(self, plugin: Any, section: Any = None, *, name: str, netns: Any = None,
              state_dir: Path | None = None) -> Any:
        """Configure and start `plugin` as `name` (its config section's name)."""
        ctx = plugin_context(name, self.node, self.pin, state_dir=state_dir)
        start_plugin(plugin, section or {}, ctx, netns=netns if netns is not None else self.netns)
        self.plugins.append(plugin)
        self.contexts[id(plugin)] = ctx
        return plugin

    def context(self, plugin: Any) -> PluginContext:
        return self.contexts[id(plugin)]

    def stop(self, plugin: Any) -> None:
        self.plugins.remove(plugin)
        plugin.kpr_stop(context=self.contexts.pop(id(plugin)))

    # -- dispatch
    def apply(self, svc: Service) -> None:
        """One bus dispatch of a changed service: the writer, then every plugin."""
        if self.writer is not None:
            self.writer.upsert(svc)
            self.generation += 1
        self._call("kpr_service_upsert", service=svc)
        self.applied[svc.key] = svc

    def delete(self, key: ServiceKey) -> None:
        if self.writer is not None:
            self.writer.delete(key)
            self.generation += 1
        self._call("kpr_service_delete", key=key)
        self.applied.pop(key, None)

    def sync_complete(self) -> None:
        self._call("kpr_sync_complete")

    def _call(self, hook: str, **kw: Any) -> None:
        # As pluggy does: a hook gets `generation` only when its signature names it.
        for p in self.plugins:
            fn = getattr(p, hook, None)
            if fn is None:
                continue
            if "generation" in inspect.signature(fn).parameters:
                fn(**kw, generation=self.generation)
            else:
                fn(**kw)

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
        """Stop every plugin still running (errors logged, the rest still stopped), close the writer."""
        try:
            for p in reversed(list(self.plugins)):
                try:
                    self.stop(p)
                except Exception:
                    logging.getLogger(__name__).exception("event=harness_stop_failed plugin=%s", type(p).__name__)
        finally:
            if self.writer is not None:
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
