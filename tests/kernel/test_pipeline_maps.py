"""The writer stage with the real service map writer, through the agent: when a plugin's
service hook runs, the kernel maps already hold that state, with the generation `kpr status`
reports for the writer."""

import threading

import pytest

from kpr import hookimpl
from kpr.daemon import Agent
from kpr.testing.agent import scratch_agent
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for

pytestmark = pytest.mark.kernel

FRONTEND = "10.96.0.10:80/TCP external"
WEB = yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"]))  # -> 10.244.1.5:8080


class ReadsMaps:
    """A plugin that needs the shared maps and, in each service hook, reads what the kernel
    maps hold for web (through the writer's read-back, which dumps the kernel maps)."""

    def __init__(self):
        self.writer = None
        self.writer_known = threading.Event()  # set by the test once the agent made the writer
        self.delivered: list[list[str]] = []  # the backends of each upsert
        self.seen: list[tuple[str, object, int]] = []  # (hook, web's backends in the maps, generation)

    @hookimpl
    def kpr_requires(self):
        return ["servicemaps"]

    def _web(self):
        assert self.writer_known.wait(10)
        entry = self.writer.read_back()["frontends"].get(FRONTEND)
        return entry["backends"] if entry else None

    @hookimpl
    def kpr_service_upsert(self, service, generation):
        self.seen.append(("upsert", self._web(), generation))
        self.delivered.append([f"{b.address}:{b.port}" for b in service.frontends[0].backends])

    @hookimpl
    def kpr_service_delete(self, key, generation):
        self.seen.append(("delete", self._web(), generation))

    @hookimpl
    def kpr_sync_complete(self, generation):
        self.seen.append(("sync", self._web(), generation))


def test_plugins_see_each_change_already_in_the_kernel_maps(require_kernel):
    with scratch_agent("kpr-h1-pipeline", source={"emptyGracePeriod": 0}) as cfg:
        web = cfg.manifest("web", WEB)
        cfg.write()
        plugin = ReadsMaps()
        agent = Agent(cfg.parse(), internal_plugins={"reads": plugin})
        agent.setup()
        try:
            assert "servicemaps" not in agent.bus.workers, "the writer is the bus's stage, not a plugin worker"
            plugin.writer = agent.kpm.facility("servicemaps").plugin
            plugin.writer_known.set()
            wait_for(agent.bus.synced, 15, "the agent to sync")
            assert plugin.seen[:2] == [("upsert", ["10.244.1.5:8080"], 1), ("sync", ["10.244.1.5:8080"], 1)], \
                "the initial state is in the maps before any plugin hears of it"

            web.write_text(WEB.replace("10.244.1.5", "10.244.1.6"))
            wait_for(lambda: any(s[0] == "upsert" and s[1] == ["10.244.1.6:8080"] for s in plugin.seen), 15, "the change", lambda: plugin.seen)
            web.unlink()
            wait_for(lambda: plugin.seen[-1][0] == "delete", 15, "the delete", lambda: plugin.seen)
            assert plugin.seen[-1][1] is None, "a deleted service is gone from the maps when the hook runs"
            in_maps = [s[1] for s in plugin.seen if s[0] == "upsert"]
            assert in_maps == plugin.delivered, "each upsert ran with its own state already in the maps"
            gens = [s[2] for s in plugin.seen]
            assert gens == sorted(gens) and gens[-1] > 1

            st = agent.status()["plugins"]["servicemaps"]
            assert st["details"]["synced"] and st["bus"]["generation"] == gens[-1]
            assert st["bus"]["synced"] and st["bus"]["failing"] == {}
        finally:
            assert agent.shutdown() == 0


def test_the_writers_retry_of_a_failed_initial_sync_hands_everything_on(pin_dir):
    """The real writer's initial sync fails (its maps are not open yet) and the stage holds the
    plugins' events; once the writer is started (it opens the maps) its own retry writes the
    initial state, and only then does the plugin get everything, in order, the maps holding it."""
    from kpr.bus import Backoff, EventBus
    from kpr.model import Frontend, FrontendType, NodeInfo, Protocol, Service, ServiceKey
    from kpr.pluginmanager import hook_caller
    from kpr.servicemaps import ServiceMapWriter

    web = Service(ServiceKey("default", "web"), (Frontend(FrontendType.CLUSTER_IP, "10.96.0.10", 80, Protocol.TCP),))
    writer = ServiceMapWriter(pin_dir, check_interval=0, retry_backoff=Backoff(0.05, 0.1))
    plugin = ReadsMaps()
    plugin.writer = writer
    plugin.writer_known.set()
    bus = EventBus()
    bus.set_writer("servicemaps", writer)
    bus.add_plugin("reads", hook_caller(plugin, "reads"))
    bus.start()
    try:
        bus.upsert(web)
        bus.node_changed(NodeInfo("n1", ("10.0.0.2",)))
        bus.sync_complete()
        wait_for(lambda: writer.sync_error, 10, "the failed initial sync")
        assert not bus.wait_idle(0.3) and plugin.seen == [], "held while the maps lack the initial state"
        writer.kpr_start(None)  # opens the maps; its retry loop writes the initial state
        wait_for(bus.synced, 10, "the plugin to get the initial state", lambda: plugin.seen)
        assert [s[0] for s in plugin.seen] == ["upsert", "sync"]
        assert plugin.seen[0][1] == [], "web (no backends) in the kernel maps when its hook ran"
        assert {s[2] for s in plugin.seen} == {1} and writer.initial_written and not writer.sync_error
    finally:
        bus.stop()
        writer.kpr_stop(None)
