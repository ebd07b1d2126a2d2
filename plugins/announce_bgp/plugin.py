"""The announce_bgp plugin: hooks that turn service events into BGP announcements.

Service events update the desired routes (routes.py); the speaker (speaker.py) sends the
difference to ExaBGP, which the supervisor (exabgp.py) keeps running. The plugin itself only
wires these together and reports status.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.context import PluginContext
from kpr.model import FrontendType, NodeInfo, PluginStatus, Service, ServiceKey

from . import exabgp as X
from .config import AnnounceBGPConfig
from .routes import Advertisement, Attrs, Peer, RouteKey, RouteTable, service_routes
from .speaker import Speaker

log = logging.getLogger(__name__)

# Seconds between checks that the source address towards each peer is still the one ExaBGP
# was started with; shorter while some peer has none.
RECHECK = 10.0
RECHECK_UNRESOLVED = 1.0

# Unix socket paths are limited to 107 bytes: the socket lives in a short private directory.
RUN_DIR_PARENT = Path("/run")


def run_dir_for(state_dir: Path) -> Path:
    """A short root-only directory for the bridge socket, the same for every run of one agent
    (named after its state directory) so a killed agent leaves nothing new behind."""
    parent = RUN_DIR_PARENT if os.access(RUN_DIR_PARENT, os.W_OK) else Path(tempfile.gettempdir())
    digest = hashlib.sha256(str(Path(state_dir).resolve()).encode()).hexdigest()[:12]
    path = parent / f"kpr-bgp-{digest}"
    path.mkdir(mode=0o700, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        raise RuntimeError(f"{path} exists and is not a directory of ours: remove it")
    os.chmod(path, 0o700)
    return path


def advertisements_of(cfg: AnnounceBGPConfig) -> list[Advertisement]:
    return [
        Advertisement(
            types=frozenset(FrontendType(a) for a in adv.addresses),
            communities=tuple(adv.communities),
            large_communities=tuple(adv.large_communities),
            local_preference=adv.local_preference,
            med=adv.med,
            selector=adv.service_selector.selector(),
            namespaces=frozenset(adv.namespaces),
            peers=frozenset(adv.peers),
        )
        for adv in cfg.advertisements
    ]


def peers_of(cfg: AnnounceBGPConfig) -> list[Peer]:
    return [Peer(p.address, tuple(4 if f == "ipv4" else 6 for f in p.address_families)) for p in cfg.peers]


def router_id_for(cfg: AnnounceBGPConfig, node: NodeInfo) -> str | None:
    if cfg.router_id:
        return cfg.router_id
    v4 = node.addresses_of(4)
    return v4[0] if v4 else None


class AnnounceBGP:
    """Instantiated once per agent by the plugin manager."""

    def __init__(self) -> None:
        self.cfg: AnnounceBGPConfig | None = None
        self.context: PluginContext | None = None
        self.advertisements: list[Advertisement] = []
        self.peers: list[Peer] = []
        self.table = RouteTable()
        self.services: dict[ServiceKey, Service] = {}
        self.problems: dict[ServiceKey, list[str]] = {}
        self.router_id: str | None = None
        self.exabgp_path = ""
        self.exabgp_version = ""
        self.conf_path: Path | None = None
        self.run_dir: Path | None = None
        self.speaker: Speaker | None = None
        self.supervisor: X.Supervisor | None = None
        self.local_addresses: dict[str, str | None] = {}
        self.recheck_interval = RECHECK
        self._config_text = ""
        # Tests shorten the restart backoff.
        self.backoff = X.Backoff()

    # --- configuration -------------------------------------------------------------------

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return AnnounceBGPConfig

    @hookimpl
    def kpr_configure(self, config: AnnounceBGPConfig, context: PluginContext) -> None:
        self.cfg = config
        self.context = context
        self.advertisements = advertisements_of(config)
        self.peers = peers_of(config)
        self.router_id = router_id_for(config, context.node)
        if self.router_id is None and config.peers:
            raise ValueError("plugins.announce_bgp.routerID: not set, and the node has no IPv4 address to use as router id")

    # --- start and stop ------------------------------------------------------------------

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        cfg = self.cfg
        if not cfg.peers:
            log.warning("bgp.no_peers: nothing will be announced (plugins.announce_bgp.peers is empty)")
            return
        self.exabgp_path = X.find_exabgp(cfg.exabgp)
        self.exabgp_version = X.exabgp_version(self.exabgp_path)
        if not self.exabgp_version.startswith("5."):
            raise X.ExaBGPMissing(f"{self.exabgp_path} is ExaBGP {self.exabgp_version}; kpr needs ExaBGP 5")
        context.state_dir.mkdir(parents=True, exist_ok=True)
        self.conf_path = context.state_dir / "exabgp.conf"
        self.run_dir = run_dir_for(context.state_dir)
        try:
            # Once here, so a config ExaBGP rejects stops the start with its reason.
            self._prepare()
            self.speaker = Speaker(self.run_dir / "bridge.sock", [(p.address, p.address_families) for p in cfg.peers])
            self.speaker.start()
            self.supervisor = X.Supervisor(
                self.exabgp_path,
                self.conf_path,
                netns=cfg.netns,
                on_spawn=self.speaker.expect,
                on_exit=self.speaker.exabgp_exited,
                prepare=self._prepare,
                recheck=self._stale_local_addresses,
                recheck_interval=self.recheck_interval,
                backoff=self.backoff,
                name=f"exabgp-{context.name}",
            )
            self.supervisor.start()
        except Exception:
            self._release()
            raise
        log.info(
            "bgp.started exabgp=%s version=%s router_id=%s local_asn=%d peers=%s netns=%s",
            self.exabgp_path, self.exabgp_version, self.router_id, cfg.local_asn,
            ",".join(p.address for p in cfg.peers), cfg.netns or "-",
        )

    def _local_addresses(self) -> dict[str, str | None]:
        return {p.address: p.source_address or X.route_source(p.address, self.cfg.netns) for p in self.cfg.peers}

    def _prepare(self) -> None:
        """Before each ExaBGP start: the config with today's router id and source addresses."""
        self.local_addresses = self._local_addresses()
        unresolved = [peer for peer, local in self.local_addresses.items() if local is None]
        for peer in unresolved:
            log.warning("bgp.no_route_to_peer peer=%s netns=%s: retrying; exabgp picks a source address meanwhile", peer, self.cfg.netns or "-")
        # An address that is not there yet (interfaces still coming up) is looked for often.
        self.recheck_interval = RECHECK_UNRESOLVED if unresolved else RECHECK
        if self.supervisor is not None:
            self.supervisor.recheck_interval = self.recheck_interval
        text = X.render_config(self.cfg, self.router_id, str(self.run_dir / "bridge.sock"), self.local_addresses)
        if text == self._config_text and self.conf_path.exists():
            return
        tmp = self.conf_path.with_suffix(".tmp")
        # It may hold MD5 passwords.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            X.validate_config(self.exabgp_path, tmp)
        except Exception:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.conf_path)
        self._config_text = text
        log.info("bgp.config_written path=%s router_id=%s local=%s", self.conf_path, self.router_id,
                 ",".join(f"{k}={v}" for k, v in self.local_addresses.items()))

    def _stale_local_addresses(self) -> bool:
        # The node's address towards a peer changed (or a route to it appeared): ExaBGP binds
        # to the old one and would announce it as next hop, so it restarts with a new config.
        now = self._local_addresses()
        if now != self.local_addresses:
            log.info("bgp.source_address_changed old=%s new=%s", self.local_addresses, now)
            return True
        return False

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self._release()

    def _release(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
            self.supervisor = None
        if self.speaker is not None:
            self.speaker.close()
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            self.run_dir = None

    # --- service events ------------------------------------------------------------------

    def _routes_of(self, service: Service) -> dict[RouteKey, Attrs]:
        node = self.context.node if self.context else NodeInfo(name="")
        routes, problems = service_routes(service, self.advertisements, self.peers, node.addresses)
        if problems:
            if problems != self.problems.get(service.key):
                for p in problems:
                    log.warning("bgp.route_skipped service=%s reason=%s", service.key, p)
            self.problems[service.key] = problems
        else:
            self.problems.pop(service.key, None)
        return routes

    def _push(self, changed: set[RouteKey]) -> None:
        if self.speaker is not None and changed:
            self.speaker.update({rk: self.table.routes.get(rk) for rk in changed})

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        self.services[service.key] = service
        self._push(self.table.set(service.key, self._routes_of(service)))

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        self.services.pop(key, None)
        self.problems.pop(key, None)
        self._push(self.table.remove(key))

    @hookimpl
    def kpr_sync_complete(self) -> None:
        if self.speaker is not None:
            self.speaker.set_synced()
        log.info("bgp.synced routes=%d", len(self.table.routes))

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        # Next hops of cross-family routes, and a router id taken from the node, follow the
        # node's addresses.
        changed: set[RouteKey] = set()
        for key, service in list(self.services.items()):
            changed |= self.table.set(key, self._routes_of(service))
        self._push(changed)
        new_id = router_id_for(self.cfg, node)
        if new_id and new_id != self.router_id:
            log.info("bgp.router_id_changed old=%s new=%s", self.router_id, new_id)
            self.router_id = new_id
            if self.supervisor is not None:
                # A new config, written by _prepare; graceful restart keeps the routes at
                # the peers while the new ExaBGP comes up.
                self.supervisor.restart()
        elif self.supervisor is not None and self._stale_local_addresses():
            self.supervisor.restart()

    # --- observation ---------------------------------------------------------------------

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        desired = len(self.table.routes)
        # list(): the bus worker may change the dict while a status request reads it.
        problems = [p for ps in list(self.problems.values()) for p in ps]
        if self.speaker is None or self.supervisor is None:
            return PluginStatus(
                healthy=True,
                message="no peers configured: nothing announced",
                counters={"routes_desired": desired},
                details={"problems": problems},
            )
        snap = self.speaker.snapshot()
        sup = self.supervisor
        peers = snap["peers"]
        up = [a for a, p in peers.items() if p["state"] == "up"]
        counters: dict[str, float] = {
            "peers": len(peers),
            "peers_up": len(up),
            "routes_desired": snap["desired"],
            "routes_advertised": snap["advertised"],
            "routes_failed": snap["failed"],
            "routes_skipped": len(problems),
            "commands_in_flight": snap["inFlight"],
            "announce_commands": snap["counters"].get("announces", 0),
            "withdraw_commands": snap["counters"].get("withdraws", 0),
            "command_errors": snap["counters"].get("acks_error", 0),
            "sessions_established": snap["counters"].get("sessions_up", 0),
            "exabgp_running": 1 if sup.running else 0,
            "exabgp_restarts": sup.restarts,
            "exabgp_crashes": sup.crashes,
        }
        for a, p in peers.items():
            counters[f"peer_up:{a}"] = 1 if p["state"] == "up" else 0
        running = sup.running and snap["connected"]
        healthy = running and bool(up) and not snap["failed"]
        if not sup.running:
            message = f"exabgp not running (restart {sup.restarts}): {sup.last_error}"
        elif not snap["connected"]:
            message = "exabgp running, its helper is not connected yet"
        else:
            down = [f"{a} {p['state']}" + (f" ({p['reason']})" if p["reason"] else "") for a, p in peers.items() if p["state"] != "up"]
            message = f"{len(up)}/{len(peers)} peers up, {snap['advertised']} routes advertised"
            if down:
                message += "; " + ", ".join(down)
            if snap["failed"]:
                message += f"; {snap['failed']} routes refused by exabgp"
        if not snap["synced"]:
            message += "; waiting for the initial sync"
        details: dict[str, Any] = {
            "routerID": self.router_id,
            "localASN": self.cfg.local_asn,
            "exabgp": {
                "path": self.exabgp_path,
                "version": self.exabgp_version,
                "pid": sup.pid,
                "netns": self.cfg.netns,
                "restarts": sup.restarts,
                "crashes": sup.crashes,
                "lastExit": sup.last_exit,
                "lastError": sup.last_error,
                "config": str(self.conf_path),
            },
            "peers": peers,
            "routes": snap["routes"],
            "problems": problems,
        }
        return PluginStatus(healthy=healthy, message=message, counters=counters, details=details)
