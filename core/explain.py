"""`kpr explain`: what the data path does with a connection, decided from the live maps with
the programs' own logic (lib/lb.h, lib/sock.h, lib/nodeport.h's kpr_np_lb), step by step:

  lookup    kpr_lb_lookup: the frontend's external entry; a miss on a node address retries
            the wildcard NodePort entry; in-cluster callers (the socket hooks) take the
            internal entry when the service has two scopes
  hook      the socket hooks translate every type; tc/XDP only NodePort, LoadBalancer,
            ExternalIP and HostPort (ClusterIP stays with the socket hooks)
  ranges    kpr_lb_src_allowed: loadBalancerSourceRanges (the socket hooks leave such
            services to the per-packet path: the source is not known at connect())
  policy    a Local scope without local backends drops (tc/XDP)
  pick      conntrack (tc/XDP: a tracked flow keeps its backend), affinity, Maglev (the
            5-tuple hash, kpr.bpf.flowhash, indexes the scope's table), else random

Reasons are those of the drop counters (kpr.drops). The result is a plain dict (`--json`);
`render()` turns it into the text the CLI prints.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import drops
from .bpf import maps as M
from .bpf.flowhash import tuple_hash
from .readback import SCOPE_NAMES, DatapathMaps, SvcEntry, frontend_type, now_ns

log = logging.getLogger(__name__)

__all__ = ["ExplainError", "Target", "explain", "parse_endpoint", "parse_target", "render"]

_NP_TYPES = M.SVC_F_NODE_PORT | M.SVC_F_LOAD_BALANCER | M.SVC_F_EXTERNAL_IP | M.SVC_F_HOST_PORT  # KPR_NP_SVC_TYPES


class ExplainError(ValueError):
    """Bad input to explain; the message names the problem."""


@dataclass(frozen=True)
class Target:
    address: str
    port: int
    protocol: str = "TCP"

    @property
    def proto(self) -> int:
        return M.IPPROTO[self.protocol]

    def text(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


def parse_endpoint(text: str, *, port_required: bool) -> tuple[str, int | None]:
    """ "10.0.0.1", "10.0.0.1:80", "[fd00::1]:80", "fd00::1" -> (address, port or None)."""
    t = text.strip()
    host, port = t, None
    if t.startswith("["):
        end = t.find("]")
        if end < 0:
            raise ExplainError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = t[1:end], t[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ExplainError(f"{text!r}: expected ':PORT' after ']'")
            port = rest[1:]
    elif t.count(":") == 1:
        host, port = t.split(":")
    try:
        addr = str(ipaddress.ip_address(host))
    except ValueError:
        raise ExplainError(f"{text!r}: {host!r} is not an IP address") from None
    if port is None:
        if port_required:
            raise ExplainError(f"{text!r}: a port is required (ADDR:PORT, [ADDR6]:PORT)")
        return addr, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ExplainError(f"{text!r}: port {port!r} is not a number from 1 to 65535")
    return addr, int(port)


def parse_target(text: str) -> Target:
    """ADDR:PORT[/PROTO] (PROTO: TCP, UDP or SCTP; TCP when left out)."""
    ep, _, proto = text.partition("/")
    proto = (proto or "TCP").upper()
    if proto not in M.IPPROTO:
        raise ExplainError(f"{text!r}: protocol {proto!r} is not one of {', '.join(M.IPPROTO)}")
    addr, port = parse_endpoint(ep, port_required=True)
    assert port is not None
    return Target(addr, port, proto)


def _backend_text(b: dict[str, Any] | None, with_state: bool = True) -> str:
    if b is None:
        return "?"
    host = f"[{b['address']}]" if ":" in b["address"] else b["address"]
    notes = []
    if with_state and b.get("state", "active") != "active":
        notes.append(b["state"])  # in this service: a KEP-1669 fallback when among the selectable
    if b.get("local"):
        notes.append("local")
    return f"{host}:{b['port']}" + (f" ({', '.join(notes)})" if notes else "")


def _lookup(dm: DatapathMaps, t: Target, hook: str, steps: list[str]) -> SvcEntry | None:
    """kpr_lb_lookup with the flags the hook passes."""
    raw = M.addr_to_bytes(t.address)
    e = dm.service(raw, t.port, t.proto, M.SCOPE_EXTERNAL)
    if e is None:
        if dm.is_node_address(raw, hook) or (hook == "socket" and _is_loopback(t.address)):
            wild = M.wildcard_bytes(6 if ":" in t.address else 4)
            e = dm.service(wild, t.port, t.proto, M.SCOPE_EXTERNAL)
            if e is not None:
                steps.append(f"{t.address} is a node address: the wildcard NodePort entry :{t.port} applies")
    if e is None:
        return None
    if hook == "socket" and e.has(M.SVC_F_TWO_SCOPES):
        internal = dm.service(e.addr, t.port, t.proto, M.SCOPE_INTERNAL)
        if internal is not None:
            steps.append("an in-cluster caller: the internal scope (internalTrafficPolicy) applies")
            return internal
    return e


def _is_loopback(addr: str) -> bool:
    return ipaddress.ip_address(addr).is_loopback


def _nodeport_devices(pin_path: Path) -> dict[str, set[str]]:
    """Device -> {"tc", "xdp"}: where kpr recorded its NodePort programs (kpr_np_*, kpr_xnp_*)."""
    from .bpf.cleanup import attachments

    out: dict[str, set[str]] = {}
    try:
        for rec in attachments(pin_path):
            dev = (rec.get("target") or {}).get("ifname")
            if dev and str(rec.get("prog_name", "")).startswith(("kpr_np_", "kpr_xnp_")):
                out.setdefault(dev, set()).add(rec["kind"])
    except OSError as e:
        log.debug("explain.attachments_unreadable error=%s", e)
    return out


def _device_hook(pin_path: Path, device: str) -> str:
    """"XDP" or "tc" on the device (XDP runs first)."""
    kinds = _nodeport_devices(pin_path).get(device, set())
    if "xdp" in kinds:
        return "XDP"
    return "tc" if "tc" in kinds else "tc/XDP (no kpr program recorded on it)"


def _auto_via(pin_path: Path, target: Target) -> tuple[str, str]:
    """No --via: the socket hooks when socklb's maps are pinned and either no NodePort program
    is attached or the frontend is a ClusterIP (what a pod would dial); else the first device
    with a NodePort program (what an external client would come through)."""
    devices = sorted(_nodeport_devices(pin_path))
    if (pin_path / "kpr_sock_hostaddr").exists():
        if not devices:
            return "socket", ""
        with DatapathMaps(pin_path) as dm:
            e = dm.service(M.addr_to_bytes(target.address), target.port, target.proto, M.SCOPE_EXTERNAL)
        if e is not None and e.has(M.SVC_F_CLUSTER_IP):
            return "socket", ""
    return "device", devices[0] if devices else ""


def explain(
    pin_path: Path | str,
    target: Target,
    *,
    source: str | None = None,
    sport: int | None = None,
    via: str = "auto",
    device: str = "",
) -> dict[str, Any]:
    """What the data path does with a connection to `target` from `source`:`sport` through
    `via` ("socket", "device" on `device`, or "auto": see _auto_via). Raises ExplainError for
    bad input and FileNotFoundError when no maps are pinned at `pin_path`."""
    if via not in ("socket", "device", "auto"):
        raise ExplainError(f"--via must be 'socket' or 'device NAME', got {via!r}")
    if source is not None and (":" in source) != (":" in target.address):
        raise ExplainError(f"source {source} and frontend {target.address} are of different address families")
    pin_path = Path(pin_path)
    if via == "auto":
        DatapathMaps(pin_path).close()  # no maps: say so before guessing a hook
        via, device = _auto_via(pin_path, target)
    hook = "socket" if via == "socket" else "device"
    out: dict[str, Any] = {
        "frontend": target.text(),
        "from": None if source is None else (f"[{source}]" if ":" in source else source) + (f":{sport}" if sport else ""),
        "hook": "socket (cgroup connect/sendmsg)" if hook == "socket" else f"{_device_hook(pin_path, device)} on {device or '?'}",
        "service": None,
        "verdict": "",
        "reason": None,
        "steps": [],
    }
    steps: list[str] = out["steps"]
    with DatapathMaps(pin_path) as dm:
        e = _lookup(dm, target, hook, steps)
        if e is None and hook == "device" and dm.is_announced(M.addr_to_bytes(target.address)):
            out["verdict"] = "drop"
            out["reason"] = drops.VIP_UNSERVED
            steps.append(f"no entry for {target.text()} in kpr_svc, but {target.address} is an announced address "
                         "(kpr_np_vip): tc/XDP drop what no frontend of it takes")
            return out
        if e is None:
            out["verdict"] = "not_a_service"
            steps.append(f"no entry for {target.text()} in kpr_svc: the data path leaves it alone")
            return out
        out["service"] = {
            "type": frontend_type(e.flags),
            "entry": f"{'[' + e.address + ']' if ':' in e.address else e.address}:{e.port}/{target.protocol}",
            "scope": SCOPE_NAMES.get(e.scope, str(e.scope)),
            "trafficPolicy": "Local" if e.has(M.SVC_F_LOCAL_SCOPE) else "Cluster",
            "revNat": e.rev_nat,
            "flags": e.flag_names,
            "algorithm": e.algorithm,
            "affinityTimeout": e.affinity_timeout if e.has(M.SVC_F_AFFINITY) else 0,
        }
        # each with its state in this service, from its slot (a pod port shared by services
        # may be ready in one and terminating in another)
        members = dm.members(e)
        out["backends"] = [b for b in members if b["slot"] <= e.count]
        out["terminating"] = [b for b in members if b["slot"] > e.count]
        _decide(dm, e, target, hook, source, sport, out)
    return out


def _decide(dm: DatapathMaps, e: SvcEntry, t: Target, hook: str, source: str | None, sport: int | None,
            out: dict[str, Any]) -> None:
    steps: list[str] = out["steps"]
    if hook == "device" and not e.flags & _NP_TYPES:
        out["verdict"] = "pass"
        steps.append(f"a {frontend_type(e.flags)} frontend: tc/XDP leave it to the socket hooks and the stack")
        return
    if hook == "socket" and e.has(M.SVC_F_EXTERNAL_IP) and not dm.is_node_address(e.addr, "socket"):
        steps.append("an ExternalIP that is not this node's: a pod's socket is not translated (CVE-2020-8554); "
                     "the host's own sockets are")
    ranges = dm.source_ranges(e.rev_nat) if e.has(M.SVC_F_SOURCE_RANGES) else []
    out["sourceRanges"] = {"ranges": ranges, "allowed": None}
    if e.has(M.SVC_F_SOURCE_RANGES):
        if hook == "socket":
            out["verdict"] = "pass"
            out["reason"] = "skip_source_ranges"
            steps.append("loadBalancerSourceRanges: the socket hooks leave the service to the per-packet path "
                         "(the client address is chosen after connect())")
            return
        if source is None:
            steps.append(f"loadBalancerSourceRanges {', '.join(ranges)}: depends on the source (give --from)")
        else:
            allowed = dm.source_allowed(e.rev_nat, M.addr_to_bytes(source))
            out["sourceRanges"]["allowed"] = allowed
            if not allowed:
                out["verdict"] = "drop"
                out["reason"] = drops.SOURCE_RANGE
                steps.append(f"{source} is outside loadBalancerSourceRanges {', '.join(ranges)}: dropped")
                return
            steps.append(f"{source} is inside loadBalancerSourceRanges {', '.join(ranges)}")
    if hook == "device" and source is not None and sport:
        ct = dm.conntrack(M.addr_to_bytes(source), M.addr_to_bytes(t.address), sport, t.port, t.proto)
        if ct is not None and dm.backend(ct["backend_id"]) is not None:
            out["verdict"] = "forward"
            out["backend"] = _member(dm, out, ct["backend_id"])
            out["by"] = "conntrack"
            steps.append(f"a tracked flow ({ct['map']}): it keeps its backend")
            b = out["backend"]
            if ct["nat_port"] and b is not None:
                nat = ct["nat_addr"]
                reply = dm.snat_reply(M.addr_to_bytes(b["address"]), b["port"], nat, ct["nat_port"], t.proto)
                out["snat"] = {"address": M.bytes_to_addr(nat), "port": ct["nat_port"], "replies": reply}
                steps.append(f"source-NATed to {M.bytes_to_addr(nat)}:{ct['nat_port']}; replies found in "
                             f"{reply or 'no map (not translated back)'}")
            return
    if e.count == 0:
        if hook == "device" and e.has(M.SVC_F_LOCAL_SCOPE):
            out["verdict"] = "drop"
            out["reason"] = drops.NO_LOCAL_BACKEND
            steps.append("externalTrafficPolicy Local and no backend on this node: dropped")
        else:
            out["verdict"] = "refuse" if hook == "socket" else "drop"
            out["reason"] = drops.NO_BACKEND
            steps.append("no selectable backend: " + ("connect() fails with ECONNREFUSED" if hook == "socket"
                                                        else "ICMP unreachable (rate-limited) or dropped"))
        return
    out["verdict"] = "forward"
    if e.has(M.SVC_F_AFFINITY):
        steps.append(f"sessionAffinity ClientIP ({e.affinity_timeout}s)")
        bid = _affinity_backend(dm, e, source, hook)
        if bid:
            out["backend"] = _member(dm, out, bid)
            out["by"] = "affinity"
            steps.append("an affinity entry within its timeout names a selectable backend: it is reused")
            return
        _random(dm, e, out, f"no live affinity entry: a random one of the {e.count} selectable backends (then remembered)")
        return
    if e.has(M.SVC_F_MAGLEV):
        if hook == "socket":
            out["backend"] = None
            out["by"] = "maglev"
            steps.append("Maglev on the socket's netns and cookie: one of the backends, fixed per socket")
            return
        if source is None or not sport:
            out["backend"] = None
            out["by"] = "maglev"
            steps.append("Maglev: the backend depends on the source address and port (give --from SRC:PORT)")
            return
        h = tuple_hash(source, sport, t.address, t.port, t.proto)
        pick = dm.maglev_pick(e, h)
        if pick is not None and pick[0]:
            bid, idx, size = pick
            out["backend"] = _member(dm, out, bid)
            out["by"] = "maglev"
            out["maglev"] = {"hash": h, "slot": idx, "tableSize": size}
            steps.append(f"Maglev: flow hash {h:#010x} -> table slot {idx} of {size}")
            return
        steps.append("Maglev without a table (yet): random")
    _random(dm, e, out, f"random: any of the {e.count} selectable backends")


def _member(dm: DatapathMaps, out: dict[str, Any], bid: int) -> dict[str, Any] | None:
    """Backend `bid` as this service lists it (its state here), else the shared entry (a
    tracked flow's backend that has left the service)."""
    return next((b for b in out["backends"] + out["terminating"] if b["id"] == bid), None) or dm.backend(bid)


def _random(dm: DatapathMaps, e: SvcEntry, out: dict[str, Any], step: str) -> None:
    """A random pick among slots 1..count: exact only when there is one."""
    out["by"] = "random"
    if e.count == 1:
        out["backend"] = _member(dm, out, dm.slot_backend(e, 1))
        out["steps"].append("random, but there is one selectable backend")
        return
    out["backend"] = None
    out["steps"].append(step)


def _affinity_backend(dm: DatapathMaps, e: SvcEntry, source: str | None, hook: str) -> int:
    """kpr_lb_affinity_backend for an address client (tc/XDP); 0 when unknown or expired."""
    if hook == "socket" or source is None:
        return 0  # the socket hooks key affinity by netns cookie, not known here
    got = dm.affinity(M.addr_to_bytes(source), e.rev_nat)
    if got is None:
        return 0
    last_used, bid, slot = got
    if now_ns() - last_used > e.affinity_timeout * 1_000_000_000:
        return 0
    ids = dm.slots(e)[: e.count]
    if 1 <= slot <= e.count and ids[slot - 1] == bid:
        return bid
    return bid if bid in ids[:4] else 0  # KPR_LB_AFFINITY_SCAN


def render(r: dict[str, Any]) -> str:
    lines = [f"{r['frontend']}" + (f" from {r['from']}" if r.get("from") else "") + f" via {r['hook']}"]
    svc = r.get("service")
    if svc:
        lines.append(
            f"  frontend: {svc['type']} {svc['entry']}  scope {svc['scope']} (traffic policy {svc['trafficPolicy']})"
            f"  algorithm {svc['algorithm']}" + (f"  affinity {svc['affinityTimeout']}s" if svc["affinityTimeout"] else "")
        )
        bes = r.get("backends") or []
        lines.append(f"  backends: {', '.join(_backend_text(b) for b in bes) or '(none)'}"
                     + (f"  terminating: {', '.join(_backend_text(b, False) for b in r['terminating'])}" if r.get("terminating") else ""))
    for s in r["steps"]:
        lines.append(f"  - {s}")
    v = r["verdict"]
    if v == "forward":
        b = r.get("backend")
        lines.append(f"=> forwarded to {_backend_text(b)} ({r.get('by')})" if b else f"=> forwarded to one of the backends ({r.get('by')})")
    elif v in ("drop", "refuse"):
        what = f"{'dropped' if v == 'drop' else 'refused'}: {r['reason']}"
        lines.append(f"=> {what}" if svc else f"=> {r['frontend']} is no service, and {what}")
    elif v == "pass":
        lines.append("=> not translated here" + (f" ({r['reason']})" if r.get("reason") else ""))
    else:
        lines.append(f"=> {r['frontend']} is no service")
    return "\n".join(lines)
