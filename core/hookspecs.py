"""Every hook a kpr plugin can implement.

Hooks are grouped by lifecycle, in the order the agent calls them:

1. configuration: ``kpr_config_schema``, ``kpr_requires``, ``kpr_configure``
2. start: ``kpr_start``
3. service events, delivered by the event bus: ``kpr_service_upsert``,
   ``kpr_service_delete``, ``kpr_sync_complete``
4. node events: ``kpr_node_changed``, ``kpr_pods_changed``
5. observation: ``kpr_status``
6. shutdown: ``kpr_stop``

The agent calls the configuration, start, status and stop hooks of each enabled plugin on its
own (one plugin's failure is reported under its name and never hides another's result), and
delivers service and node events to each plugin from that plugin's own worker, so a slow or
failing plugin never holds up the others. Unless a docstring says otherwise, every result is
collected ("first result wins" is never used: no hook here is ``firstresult``).

A plugin implements hooks with ``@kpr.hookimpl``; see ``examples/plugin/`` for a complete one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import hookspec

if TYPE_CHECKING:
    from collections.abc import Mapping

    import pydantic

    from .context import PluginContext
    from .model import NodeInfo, PluginStatus, Service, ServiceKey


# --- 1. configuration ---------------------------------------------------------------------


@hookspec
def kpr_config_schema() -> "type[pydantic.BaseModel] | None":
    """Declare the plugin's config section under ``plugins.<name>``.

    Called: once per installed plugin while the config is loaded (``kpr run`` and
    ``kpr check-config``), before the plugin is configured, for enabled and disabled plugins
    alike, so ``check-config`` catches mistakes in a section that is switched off.

    Returns: a pydantic model class for the section. The ``enabled`` key is the core's and is
    removed before validation. Return ``None`` (or do not implement the hook) for a plugin
    without keys of its own; then any other key in its section is an error.
    """


@hookspec
def kpr_requires() -> "list[str]":
    """Name the core facilities an enabled plugin needs.

    Called: once per enabled plugin after its section validated, before any plugin is
    configured.

    Returns: names of core facilities, from: ``"servicemaps"`` (the shared BPF service maps,
    pinned under ``bpf.pinPath`` and written by the core's service map writer, which is then
    started before every plugin, stopped after them, and applies every service change before
    any plugin's worker gets it); ``"nodeport"`` (the NodePort maps, their conntrack collector
    and the health-check server, shared by tc_nodeport and xdp_nodeport); ``"nexthops"`` (the
    one next-hop watcher of the agent's namespace, ``kpr.nexthops``, to which NodePort and
    host_routing subscribe). An unknown name stops start-up with the plugin's name.
    """


@hookspec
def kpr_configure(config: "pydantic.BaseModel | None", context: "PluginContext") -> None:
    """Hand an enabled plugin its validated config section and its context.

    Called: once per enabled plugin, after the whole config validated and before any
    ``kpr_start``.

    Args:
        config: an instance of the model the plugin returned from ``kpr_config_schema``,
            or ``None`` when it declared none.
        context: the plugin's name, node facts, a logger, the whole config, a state
            directory and core facilities: ``kube_client()`` (the API server) and
            ``status_writer()`` (the source's write-back of Service status, see
            kpr.sources.StatusWriter).

    Returns: nothing. Raising stops start-up with the plugin's name and the error.
    """


# --- 2. start -----------------------------------------------------------------------------


@hookspec
def kpr_start(context: "PluginContext") -> None:
    """Acquire what the plugin needs: load programs, attach, open sockets, start threads.

    Called: once per enabled plugin after every plugin was configured and before the first
    service event.

    Args:
        context: the same context ``kpr_configure`` received.

    Returns: nothing. Raising stops start-up; plugins already started are stopped.
    """


# --- 3. service events --------------------------------------------------------------------


@hookspec
def kpr_service_upsert(service: "Service", generation: int = 0) -> None:
    """Make the data path match the whole desired state of one service.

    Called: from the plugin's bus worker whenever a service appears or changes, with the
    latest state only (bursts are coalesced), and again after a failure, with backoff.
    Calls for one service never overlap, and calls for different services reach one plugin
    one at a time. When the agent runs the service map writer (some enabled plugin requires
    ``"servicemaps"``), the writer applied the change first: when this hook runs, the service
    maps already hold this state or a newer one (unless the writer refused the service for
    capacity: then they keep its last good state, and ``kpr status`` names it). A plugin never
    polls the maps to learn whether the writer has caught up.

    Args:
        service: the complete desired state (level-triggered, not a diff). Handlers must
            be idempotent: the same service may be delivered more than once.
        generation: the service maps' generation once this change was applied: it grows by
            one with every batch the writer applied, and the changes of one batch share it.
            0 when the agent runs no writer. Implementations may leave it out of their
            signature.

    Returns: nothing. Raising marks the delivery failed: it is logged, counted in the
    plugin's status and retried with backoff until it succeeds or a newer state replaces it.
    """


@hookspec
def kpr_service_delete(key: "ServiceKey", generation: int = 0) -> None:
    """Remove everything the plugin holds for one service.

    Called: from the plugin's bus worker when a service disappears (deleted, became
    headless or ExternalName, or handed to another proxy). Delivery, ordering, retries and
    the maps' promise as for ``kpr_service_upsert``: with the writer, the maps no longer hold
    the service (or hold a newer state of it) when this runs. A delete may come for a service
    the plugin never saw.

    Args:
        key: the namespace and name of the service.
        generation: the service maps' generation once the delete was applied, as for
            ``kpr_service_upsert``.

    Returns: nothing. Raising is retried with backoff.
    """


@hookspec
def kpr_sync_complete(generation: int = 0) -> None:
    """Signal that the full initial state has been delivered to this plugin.

    Called: once per plugin, from its bus worker, after every service that existed at
    start-up was delivered (successfully or given up for retry). With the writer, the
    initial state is in the maps when this runs (its full sync is written), and no service
    event reaches any plugin before that. A plugin that garbage collects state left from an
    earlier run (pinned maps, announced routes) does it here.

    Args:
        generation: the service maps' generation holding the initial state (0 without a
            writer).

    Returns: nothing.
    """


# --- 4. node events -----------------------------------------------------------------------


@hookspec
def kpr_node_changed(node: "NodeInfo") -> None:
    """React to new node facts: addresses or external devices changed.

    Called: from the plugin's bus worker when the node's addresses or devices change after
    start-up; the plugin's ``context.node`` already holds the new facts. Services whose
    frontends depend on node addresses (NodePort) are re-delivered after it: a node change is
    a barrier in the plugin's queue, so no service queued after it (even one already waiting
    before it) reaches the plugin before it.

    Args:
        node: the node's name, addresses and external devices.

    Returns: nothing. Raising is logged and counted.
    """


@hookspec
def kpr_pods_changed(pods: "Mapping[str, tuple[str, ...]]") -> None:
    """The pods running on this node changed.

    Called: from the plugin's bus worker whenever the source delivers a Pod change that
    changes the set (level-triggered: the whole set every time; a newer set replaces one not
    delivered yet). Both sources deliver Pods: the Kubernetes source this node's Pods (field
    selector spec.nodeName), the files source every Pod in the manifests.

    Args:
        pods: ``"namespace/name"`` -> the pod's IPs (one per family), for pods on this node
            (spec.nodeName) in their own network namespace (not hostNetwork), not finished
            (phase Succeeded/Failed) and with an address.

    Returns: nothing. Raising is logged, counted and retried with backoff.
    """


# --- 5. observation -----------------------------------------------------------------------


@hookspec
def kpr_status() -> "PluginStatus | None":
    """Report the plugin's health and counters.

    Called: per enabled plugin on ``kpr status``, the local API's status request and every
    metrics scrape; must be quick and must not block on the data path.

    Returns: a ``PluginStatus`` (healthy, message, counters, details), or ``None`` for
    "healthy, nothing to say". The core adds the bus's own counters for the plugin.
    """


# --- 6. shutdown --------------------------------------------------------------------------


@hookspec
def kpr_stop(context: "PluginContext") -> None:
    """Release what ``kpr_start`` acquired that must not outlive the agent.

    Called: once per started plugin on shutdown, in the reverse order of start, only after
    the plugin's bus worker has left the hook it was in; if the worker is still inside one
    when the agent's wait for it ends (three quarters of agent.shutdownTimeout), the agent
    logs ``plugin.stop_busy`` with the plugin and the hook and calls ``kpr_stop`` anyway.
    Every stop is bounded by the shutdown timeout, a stop after a failed start included.
    Pinned BPF state that keeps established flows working across a restart should stay
    (``kpr cleanup`` removes it).

    Args:
        context: the plugin's context.

    Returns: nothing. Raising is logged; the other plugins still stop.
    """
