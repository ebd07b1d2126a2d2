"""The announce_arp plugin: which addresses this node announces, kept in step with services,
membership and eligibility, and handed to the BPF answerer (which answers requests where its
program attaches), the responder (announcements, and answers elsewhere) and the drop table.

Every change (a service event, sync completion, a peer joining, leaving or changing its
eligibility) only marks the state dirty; one controller thread recomputes ownership from
scratch, so the outcome depends on the current inputs only, never on the order events came in.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.bus import Backoff
from kpr.context import PluginContext
from kpr.model import BackendState, Frontend, NodeInfo, PluginStatus, Service, ServiceKey

from . import ownership
from .bpfanswer import BpfAnswerer
from .config import AnnounceARPConfig
from .droprules import DropRules
from .heartbeat import Codec, cluster_id
from .leases import KubernetesMembership
from .membership import HeartbeatMembership, Membership, SoloMembership
from .responder import Responder, missing_interfaces

log = logging.getLogger(__name__)

KEY = "plugins.announce_arp"
MIN_KEY_BYTES = 16


def read_key(path: os.PathLike[str] | str) -> bytes:
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            key = f.read().strip()
    except OSError as e:
        raise ValueError(f"{KEY}.keyFile: cannot read {path}: {e.strerror}") from None
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{KEY}.keyFile: {path} holds {len(key)} bytes, at least {MIN_KEY_BYTES} are needed")
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("event=key_file_readable_by_others path=%s mode=%o", path, st.st_mode & 0o777)
    return key


def frontend_eligible(fe: Frontend) -> bool:
    """Whether this node may announce the frontend's address for this frontend.

    externalTrafficPolicy=Local: only with a ready endpoint on this node. Cluster: with a
    ready endpoint anywhere (an address with nothing behind it is not announced, as MetalLB).
    """
    local = fe.external_scope_local
    return any(b.state is BackendState.ACTIVE and (b.local or not local) for b in fe.backends)


@dataclass(frozen=True)
class _Plan:
    known: frozenset[str]
    eligible_here: frozenset[str]
    owners: dict[str, str | None]
    owned: frozenset[str]
    live: frozenset[str]
    # Live peers still loading their services while this node holds back (peerSyncTimeout).
    waiting_for: tuple[str, ...] = ()


MembershipFactory = Callable[[AnnounceARPConfig, PluginContext], Membership]


class AnnounceARP:
    """Instantiated once per agent; the factories let tests and later sources swap parts."""

    def __init__(
        self,
        *,
        membership_factory: MembershipFactory | None = None,
        responder_factory: Callable[[AnnounceARPConfig], Any] | None = None,
        droprules_factory: Callable[[AnnounceARPConfig], Any] | None = None,
        bpf_factory: Callable[[AnnounceARPConfig, PluginContext], Any] | None = None,
    ) -> None:
        self.cfg: AnnounceARPConfig | None = None
        self.context: PluginContext | None = None
        self._membership_factory = membership_factory or self._membership
        self._kube_client: Any = None
        self._responder_factory = responder_factory or self._responder
        self._droprules_factory = droprules_factory or (lambda cfg: DropRules(cfg.interfaces))
        self._bpf_factory = bpf_factory or self._bpf_answerer
        # Answers requests in BPF where it attaches (None: Python answers everywhere).
        self.bpf: Any = None
        self.membership: Membership | None = None
        self.responder: Any = None
        self.droprules: Any = None
        self.drop = False
        self._key = b""
        self._lock = threading.Lock()
        # service -> {address: eligible here}
        self._services: dict[ServiceKey, dict[str, bool]] = {}
        self._synced = False
        self._taking_part_since: float | None = None
        self._decided = False
        self._wake_at = float("inf")
        self._dirty = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._plan = _Plan(frozenset(), frozenset(), {}, frozenset(), frozenset())
        self._drop_error = ""
        self._drop_attempt = 0
        self._drop_retry_at = 0.0
        self._dropped_packets = 0
        self._next_counter_read = 0.0
        self._backoff = Backoff(0.5, 30.0)
        self.ownership_changes = 0

    # --- configuration ---------------------------------------------------------------------

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return AnnounceARPConfig

    @hookimpl
    def kpr_configure(self, config: AnnounceARPConfig, context: PluginContext) -> None:
        self.cfg, self.context = config, context
        members = config.member_list
        if members and context.node.name not in {m.name for m in members}:
            raise ValueError(
                f"{KEY}.members: this node ({context.node.name!r}, node.name) is not listed in "
                f"{', '.join(str(m) for m in members)}"
            )
        if config.key_file is not None and len(members) > 1:
            self._key = read_key(config.key_file)
        if config.membership == "kubernetes":
            from kpr.kube.client import KubeConfigError

            name = config.lease_name(context.node.name)
            if len(name) > 253:
                raise ValueError(f"{KEY}.leasePrefix: the Lease name {name[:40]}... would be {len(name)} characters, at most 253")
            # The core's client, never one of our own; made now so a missing API server
            # shows at configure time, not as a start that never becomes live.
            try:
                self._kube_client = context.kube_client()
            except KubeConfigError as e:
                raise ValueError(f"{KEY}.membership: kubernetes needs an API server: {e}") from None
        self.drop = config.drop_enabled(context.config.enabled_plugins())
        log.info(
            "event=announce_configured node=%s interfaces=%s membership=%s members=%d drop_unserved=%s",
            context.node.name, ",".join(config.interfaces), config.membership, len(members), self.drop,
        )

    def _membership(self, cfg: AnnounceARPConfig, context: PluginContext) -> Membership:
        if cfg.membership == "kubernetes":
            return self._lease_membership(cfg, context)
        return self._heartbeat_membership(cfg, context)

    def _lease_membership(self, cfg: AnnounceARPConfig, context: PluginContext) -> Membership:
        assert self._kube_client is not None, "kpr_configure gets the client for membership: kubernetes"
        return KubernetesMembership(
            context.node.name,
            self._kube_client,
            namespace=cfg.lease_namespace,
            prefix=cfg.lease_prefix,
            lease_duration=cfg.lease_duration,
            renew_interval=cfg.renew_interval,
        )

    def _heartbeat_membership(self, cfg: AnnounceARPConfig, context: PluginContext) -> Membership:
        members = cfg.member_list
        if len(members) <= 1:
            return SoloMembership(context.node.name)
        return HeartbeatMembership(
            context.node.name,
            members,
            cfg.heartbeat_port,
            Codec(self._key, cluster_id(members, cfg.heartbeat_port)),
            heartbeat_interval=cfg.heartbeat_interval,
            dead_interval=cfg.dead_interval,
            max_skew=cfg.max_clock_skew,
        )

    @staticmethod
    def _responder(cfg: AnnounceARPConfig) -> Responder:
        return Responder(cfg.interfaces, garp_repeat=cfg.garp_repeat, garp_spacing=cfg.garp_spacing, garp_interval=cfg.garp_interval)

    @staticmethod
    def _bpf_answerer(cfg: AnnounceARPConfig, context: PluginContext) -> BpfAnswerer | None:
        if cfg.responder == "python":
            return None
        # A killed agent's program stops answering within `hold`, before its peers give up
        # on it (deadInterval / leaseDuration after its last heartbeat) and take its
        # addresses; as long as that, so a briefly starved agent does not stop answering.
        expiry = cfg.lease_duration if cfg.membership == "kubernetes" else cfg.dead_interval
        return BpfAnswerer(cfg.interfaces, Path(context.config.bpf.pin_path), hold=min(1.0, 0.8 * expiry))

    def _start_bpf(self, cfg: AnnounceARPConfig, context: PluginContext) -> None:
        self.bpf = self._bpf_factory(cfg, context)
        if self.bpf is None:
            return
        if self.bpf.load():
            for ifname, why in self.bpf.attach_all().items():
                log.warning("event=arp_answered_in_python interface=%s reason=%s", ifname, why)
        self.responder.answer_on(set(cfg.interfaces) - self.bpf.answering())

    # --- start / stop ----------------------------------------------------------------------

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        cfg = self.cfg
        assert cfg is not None, "kpr_configure first"
        missing = missing_interfaces(cfg.interfaces)
        if missing:
            raise ValueError(f"{KEY}.interfaces: no such interface on this node: {', '.join(missing)}")
        self.membership = self._membership_factory(cfg, context)
        self.responder = self._responder_factory(cfg)
        self._start_bpf(cfg, context)
        if self.drop:
            self.droprules = self._droprules_factory(cfg)
        self.membership.subscribe(self._dirty.set)
        self._stop.clear()
        self.responder.start()
        self.membership.start()
        self._thread = threading.Thread(target=self._control_loop, name="kpr-arp-control", daemon=True)
        self._thread.start()
        self._dirty.set()

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        self._stop.set()
        self._dirty.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        # Stop answering first, then tell the peers, so they take over within one round trip
        # and never while this node still answers; only then wait for threads to finish.
        if self.bpf is not None:
            self.bpf.stop()
        if self.responder is not None:
            self.responder.set_owned(set())
        if self.membership is not None:
            self.membership.stop()
        if self.responder is not None:
            self.responder.stop()
        if self.droprules is not None:
            try:
                self.droprules.remove()
            except Exception as e:
                log.error("event=droprules_remove_failed error=%s", e)
        log.info("event=announce_stopped")

    # --- events ----------------------------------------------------------------------------

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        addrs = self._addresses_of(service)
        with self._lock:
            if addrs:
                self._services[service.key] = addrs
            else:
                self._services.pop(service.key, None)
        self._dirty.set()

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        with self._lock:
            self._services.pop(key, None)
        self._dirty.set()

    @hookimpl
    def kpr_sync_complete(self) -> None:
        with self._lock:
            self._synced = True
        log.info("event=announce_synced services=%d", len(self._services))
        self._dirty.set()

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        # Node addresses are never announced; the set to leave out may have changed.
        self._dirty.set()

    def _addresses_of(self, service: Service) -> dict[str, bool]:
        cfg = self.cfg
        assert cfg is not None
        labels = service.label_map
        if any(labels.get(k) != v for k, v in cfg.service_selector.items()):
            return {}
        out: dict[str, bool] = {}
        for fe in service.frontends:
            if fe.type.value not in cfg.frontend_types:
                continue
            addr = ownership.normalise(fe.address)
            out[addr] = out.get(addr, False) or frontend_eligible(fe)
        return out

    # --- ownership -------------------------------------------------------------------------

    def _excluded(self) -> set[str]:
        # A node's own address is answered by its kernel; announcing it from here could move
        # it to another node.
        assert self.context is not None and self.cfg is not None
        out = {ownership.normalise(a) for a in self.context.node.addresses}
        out |= {m.address for m in self.cfg.member_list}
        return out

    def plan(self) -> _Plan:
        """Ownership from the current inputs: what every node computes alike."""
        assert self.context is not None and self.membership is not None
        me = self.context.node.name
        excluded = self._excluded()
        with self._lock:
            synced = self._synced
            per_addr: dict[str, bool] = {}
            for addrs in self._services.values():
                for addr, ok in addrs.items():
                    if addr not in excluded:
                        per_addr[addr] = per_addr.get(addr, False) or ok
        known = frozenset(per_addr)
        here = frozenset(a for a, ok in per_addr.items() if ok)
        live = self.membership.live_nodes()
        taking_part = synced and me in live
        # Peers learn our eligibility only once we would act on it (None until then): before
        # that they keep the addresses, so a starting node never opens a gap.
        self.membership.publish(here if taking_part else None)
        if not taking_part:
            self._taking_part_since = None
            self._decided = False
            return _Plan(known, here, {}, frozenset(), live)
        now = time.monotonic()
        if self._taking_part_since is None:
            self._taking_part_since = now
        peers = {n: self.membership.eligible(n) for n in live if n != me}
        unready = sorted(n for n, e in peers.items() if e is None)
        hold = self._taking_part_since + self.cfg.peer_sync_timeout - now
        # Only the first decision waits: a peer restarting later must never make this node
        # let go of what it announces.
        if unready and hold > 0 and not self._decided:
            self._wake_at = min(self._wake_at, now + hold)
            return _Plan(known, here, {}, frozenset(), live, waiting_for=tuple(unready))
        self._decided = True
        # This node claims what its peers can know it may announce (the membership's word for
        # it: the Lease membership's is what its Lease carries on the server), and gives up at
        # once what it no longer may: an address coming back is not answered by both while
        # its holder cannot know.
        mine = here & (self.membership.eligible(me) or frozenset())
        eligible: dict[str, set[str]] = {a: set() for a in known}
        for node in live:
            addrs = mine if node == me else (peers[node] or frozenset())
            for a in addrs:
                if a in eligible:
                    eligible[a].add(node)
        owners = ownership.assign(eligible)
        owned = frozenset(a for a, who in owners.items() if who == me)
        return _Plan(known, here, owners, owned, live)

    def _control_loop(self) -> None:
        while not self._stop.is_set():
            # Also once a second without a change: retries (drop rules) and counters.
            self._dirty.wait(timeout=max(0.0, min(1.0, self._wake_at - time.monotonic())))
            self._wake_at = float("inf")
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self._reconcile()
            except Exception:
                log.exception("event=reconcile_failed")
                self._dirty.set()
                self._stop.wait(1.0)

    def _reconcile(self) -> None:
        plan = self.plan()
        owned = plan.owned
        if self.droprules is not None:
            owned = self._sync_drops(plan.known, owned)
        if self.bpf is not None:
            # The program answers for a taken address before it is announced, and a dropped
            # one is never answered again from here on.
            self.bpf.set_owned(owned)
            if self.bpf.refresh():
                self.responder.answer_on(set(self.cfg.interfaces) - self.bpf.answering())
        taken, dropped = self.responder.set_owned(owned)
        if taken or dropped:
            self.ownership_changes += 1
            log.info(
                "event=ownership_changed owned=%s taken=%s dropped=%s live=%s",
                ",".join(sorted(owned)) or "-", ",".join(sorted(taken)) or "-",
                ",".join(sorted(dropped)) or "-", ",".join(sorted(plan.live)) or "-",
            )
        self._plan = plan

    def _sync_drops(self, known: frozenset[str], owned: frozenset[str]) -> frozenset[str]:
        now = time.monotonic()
        if now >= self._drop_retry_at:
            try:
                self.droprules.update(known)
                if self._drop_error:
                    log.info("event=droprules_recovered")
                self._drop_error, self._drop_attempt = "", 0
            except Exception as e:
                self._drop_attempt += 1
                delay = self._backoff.delay(self._drop_attempt)
                self._drop_retry_at = now + delay
                message = f"drop rules: {e}; retrying in {delay:.1f}s"
                if message != self._drop_error:
                    log.error("event=droprules_failed reason=%s", message)
                self._drop_error = message
        if now >= self._next_counter_read and self.droprules.installed:
            self._next_counter_read = now + 5.0
            try:
                self._dropped_packets = self.droprules.dropped()
            except Exception as e:
                log.debug("event=droprules_counter_failed error=%s", e)
        # Fail closed: an address whose traffic would not be dropped is not announced.
        return owned & self.droprules.addresses

    # --- observation -----------------------------------------------------------------------

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        if self.responder is None or self.membership is None:
            return PluginStatus(healthy=False, message="not started")
        plan = self._plan
        ok_r, msg_r, ports = self.responder.health()
        mh = self.membership.health()
        problems = [m for m in (msg_r, "" if mh.healthy else mh.message, self._drop_error) if m]
        with self._lock:
            synced = self._synced
        owned = sorted(self.responder.owned)
        c = self.responder.counters
        bpf = self.bpf.counters() if self.bpf is not None else {}
        in_bpf = self.bpf.answering() if self.bpf is not None else set()
        counters: dict[str, float] = {
            "addresses_known": len(plan.known),
            "addresses_owned": len(owned),
            "addresses_eligible": len(plan.eligible_here),
            "ownership_changes": self.ownership_changes,
            # Answers from both: Python on some interfaces, BPF on the others.
            "arp_replies": c["arp"] + sum(v["arp_replies"] for v in bpf.values()),
            "na_replies": c["na"] + sum(v["na_replies"] for v in bpf.values()),
            "requests_not_owned": c["not_owned"],
            "garp_sent": c["garp_sent"],
            "conflicts": c["gratuitous"] + sum(v["conflicts"] for v in bpf.values()),
            "socket_errors": c["socket_errors"],
            "send_errors": c["send_errors"],
            **{f"{getattr(self.membership, 'counter_prefix', 'heartbeat')}_{k}": v for k, v in mh.counters.items()},
        }
        # The program's own counters per interface, as "bpf_<counter>:<interface>".
        for ifname, values in sorted(bpf.items()):
            for name, value in values.items():
                counters[f"bpf_{name}:{ifname}"] = value
        if self.droprules is not None:
            counters["dropped_packets"] = self._dropped_packets
        if problems:
            message = "; ".join(problems)
        elif not synced:
            message = "waiting for the initial service state"
        elif plan.waiting_for:
            message = f"waiting for peers to sync: {', '.join(plan.waiting_for)}"
        else:
            message = f"owns {len(owned)} of {len(plan.known)} addresses; {mh.message}"
        return PluginStatus(
            healthy=not problems,
            message=message,
            counters=counters,
            details={
                "owned": owned,
                "owners": dict(sorted(plan.owners.items())),
                "live": sorted(plan.live),
                "waitingFor": list(plan.waiting_for),
                "eligibleHere": sorted(plan.eligible_here),
                "interfaces": ports,
                # Who answers requests on each interface: "bpf" (the tc program) or "python".
                "answering": {i: ("bpf" if i in in_bpf else "python") for i in self.cfg.interfaces},
                "bpf": ({"loadError": self.bpf.load_error, "interfaces": self.bpf.details()}
                        if self.bpf is not None else None),
                "membership": mh.details,
                "dropRules": bool(self.droprules is not None),
            },
        )
