"""Throw-away network topologies in namespaces for kernel tests.

Everything a Topology makes lives inside network namespaces it created: veths are created
directly between those namespaces (never in the host namespace), so deleting the
namespaces removes every interface. Names carry a random per-run prefix so concurrent
test runs on one machine do not collide. Teardown runs on context exit, on error, and
from atexit as a backstop.

Layout conventions (Cilium-like routing):
- node / router: forwarding on (IPv4 and IPv6).
- pod: one veth, "eth0" in the pod, "lxc<name>" in its node; the pod's address is a host
  route on the node, the pod routes everything via a gateway address that the node holds
  on the pod's veth (default 169.254.1.1 and fe80::1, as Calico does).
- external: a bare client namespace; it has only the routes a test gives it, so nothing
  leaves the machine.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import ipaddress
import json
import logging
import os
import re
import secrets
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
# Which process made each namespace, so a later run can remove what a killed run left.
OWNERS_DIR = Path("/run/kpr-testing/netns")
IFNAMSIZ = 15  # usable characters of a Linux interface name
DEFAULT_GW4 = "169.254.1.1"
DEFAULT_GW6 = "fe80::1"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CLONE_NEWNET = 0x40000000

__all__ = [
    "CommandFailed",
    "Link",
    "Namespace",
    "Topology",
    "in_netns",
    "netns_exists",
    "netns_path",
    "sweep_stale",
]


class CommandFailed(subprocess.CalledProcessError):
    """CalledProcessError whose message includes what the command printed."""

    def __str__(self) -> str:
        base = super().__str__()
        parts = [base]
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                if isinstance(text, bytes):
                    text = text.decode(errors="replace")
                parts.append(f"{label}: {text.strip()[-2000:]}")
        return "\n".join(parts)


def _run(
    cmd: Sequence[str], *, check: bool = True, timeout: float = 30, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    log.debug("event=cmd argv=%s", shlex.join(cmd))
    res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, input=input)
    if check and res.returncode != 0:
        raise CommandFailed(res.returncode, list(cmd), res.stdout, res.stderr)
    return res


def netns_path(name: str) -> Path:
    return NETNS_DIR / name


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


@contextlib.contextmanager
def in_netns(name_or_path: str | os.PathLike[str]) -> Iterator[None]:
    """Switch the calling thread into a network namespace for the block.

    For in-process calls that act on the current namespace (bcc's attach_xdp, sockets,
    pyroute2 IPRoute()). Only this thread moves; it is moved back on exit.
    """
    target = Path(name_or_path) if "/" in str(name_or_path) else netns_path(str(name_or_path))
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    try:
        fd = os.open(target, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns {target}: {os.strerror(err)}")
        finally:
            os.close(fd)
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                # Carrying on in the wrong namespace could touch the host's interfaces.
                os.write(2, f"kpr.testing.netns: cannot return to own netns: {os.strerror(err)}\n".encode())
                os._exit(70)
    finally:
        os.close(own)


def _family(addr: str) -> int:
    return ipaddress.ip_interface(addr).version


def _as_list(addrs: str | Sequence[str] | None) -> list[str]:
    if addrs is None:
        return []
    if isinstance(addrs, str):
        return [addrs]
    return list(addrs)


def _with_host_prefix(addr: str) -> str:
    if "/" in addr:
        return addr
    return f"{addr}/{32 if _family(addr) == 4 else 128}"


def _kill_ns_pids(netns: str) -> None:
    # Anything still inside one of our namespaces was started by the test (directly or by
    # a child) and would keep the namespace and its veths alive after deletion.
    res = _run(["ip", "netns", "pids", netns], check=False)
    for tok in res.stdout.split():
        if tok.isdigit():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(tok), signal.SIGKILL)


def _record_owner(netns: str) -> None:
    _write_record(OWNERS_DIR, netns, f"{os.getpid()}\n")


def _write_record(owners: Path, name: str, text: str) -> None:
    """An owner record (this module's namespaces, kpr.testing.cgroup's cgroups): written whole
    under a temporary name (.<name>.<pid>) and renamed, as a sweep reading it half written would
    take an empty record for a dead owner. Retried once: another run's tidy-up may remove the
    (then empty) directory between our mkdir and our write."""
    tmp = owners / f".{name}.{os.getpid()}"
    for attempt in (1, 2):
        try:
            owners.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            tmp.rename(owners / name)
            return
        except OSError as exc:  # bookkeeping only; the test itself still cleans up
            if attempt == 2:
                log.warning("event=owner_not_recorded dir=%s name=%s error=%s", owners, name, exc)


def _partial_record(rec: Path) -> bool:
    """Whether `rec` is a record being written (_write_record's temporary name); one whose
    writer died before the rename is removed (nothing was made under it yet)."""
    if not rec.name.startswith("."):
        return False
    writer = rec.name.rpartition(".")[2]
    if writer.isdigit() and not _pid_alive(int(writer)):
        rec.unlink(missing_ok=True)
    return True


def _tidy_owners_dir(owners: Path) -> None:
    # Leave no empty bookkeeping directories behind; losing a race here only loses a record.
    for d in (owners, owners.parent):
        with contextlib.suppress(OSError):
            d.rmdir()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Delete namespaces that Topologies of processes now dead left behind (a killed test run).

    Only namespaces recorded by this module are considered, and only when their creator
    is gone: namespaces of test runs still going on are left alone.
    """
    removed: list[str] = []
    if not OWNERS_DIR.is_dir():
        return removed
    for rec in OWNERS_DIR.iterdir():
        if _partial_record(rec):
            continue
        try:
            pid = int(rec.read_text().strip())
        except (OSError, ValueError):
            continue  # unreadable: an owner not known to be dead, so not ours to remove
        if pid <= 0 or _pid_alive(pid):
            continue
        if netns_exists(rec.name):
            _kill_ns_pids(rec.name)
            if _run(["ip", "netns", "del", rec.name], check=False).returncode == 0:
                removed.append(rec.name)
        rec.unlink(missing_ok=True)
    _tidy_owners_dir(OWNERS_DIR)
    if removed:
        log.warning("event=stale_netns_removed netns=%s", ",".join(removed))
    return removed


@dataclass
class Link:
    a: str
    b: str
    if_a: str
    if_b: str
    addrs_a: list[str] = field(default_factory=list)
    addrs_b: list[str] = field(default_factory=list)


@dataclass
class Namespace:
    topo: Topology
    name: str  # logical name within the topology
    netns: str  # real name under /run/netns
    kind: str
    ifaces: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        return netns_path(self.netns)

    def run(self, cmd: str | Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.topo.run(self.name, cmd, **kw)

    def popen(self, cmd: str | Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        return self.topo.popen(self.name, cmd, **kw)

    def enter(self) -> contextlib.AbstractContextManager[None]:
        return in_netns(self.path)


_live: dict[int, Topology] = {}
_live_lock = threading.Lock()


def _close_all_at_exit() -> None:
    with _live_lock:
        topos = list(_live.values())
    for t in topos:
        with contextlib.suppress(Exception):
            t.close()


atexit.register(_close_all_at_exit)


class Topology:
    """Namespaces, veths and routes for one test; a context manager that always tears down."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix or f"kt{secrets.token_hex(3)}"
        if not _NAME_RE.match(self.prefix):
            raise ValueError(f"bad prefix {self.prefix!r}")
        self.namespaces: dict[str, Namespace] = {}
        self.links: list[Link] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        # Only the process that made the namespaces tears them down: a forked child (pyroute2
        # runs netns work in one) that unwinds or exits must leave its parent's topology alone.
        self._owner_pid = os.getpid()
        with _live_lock:
            _live[id(self)] = self

    # -- context manager
    def __enter__(self) -> Topology:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
            return
        # Do not let a teardown problem hide the test's own failure.
        try:
            self.close()
        except Exception as teardown_exc:
            log.error("event=topology_teardown_failed prefix=%s error=%s", self.prefix, teardown_exc)

    def __getitem__(self, name: str) -> Namespace:
        return self.namespaces[name]

    def netns_name(self, name: str) -> str:
        return self.namespaces[name].netns

    # -- namespaces
    def add_namespace(self, name: str, kind: str = "generic", *, forwarding: bool = False) -> Namespace:
        if self._closed:
            raise RuntimeError("topology already torn down")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad namespace name {name!r}")
        if name in self.namespaces:
            raise ValueError(f"namespace {name!r} already in this topology")
        full = f"{self.prefix}-{name}"
        # Recorded before it exists: a run killed from here on (in the middle of `ip netns add`
        # too, which goes on without us) leaves a namespace a later sweep knows to be ours.
        _record_owner(full)
        try:
            _run(["ip", "netns", "add", full])  # fails if the name is taken: never adopt a foreign namespace
        except BaseException:
            (OWNERS_DIR / full).unlink(missing_ok=True)
            raise
        ns = Namespace(self, name, full, kind)
        self.namespaces[name] = ns
        log.info("event=netns_added netns=%s kind=%s", full, kind)
        _run(["ip", "-n", full, "link", "set", "lo", "up"])
        # No DAD: IPv6 addresses must be usable at once, tests do not wait for them.
        settings = {
            "net.ipv6.conf.all.accept_dad": "0",
            "net.ipv6.conf.default.accept_dad": "0",
        }
        if forwarding:
            settings |= {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
        self.sysctl(name, settings)
        return ns

    def add_node(self, name: str) -> Namespace:
        return self.add_namespace(name, "node", forwarding=True)

    def add_router(self, name: str) -> Namespace:
        return self.add_namespace(name, "router", forwarding=True)

    def add_external(self, name: str) -> Namespace:
        return self.add_namespace(name, "external", forwarding=False)

    def add_pod(
        self,
        node: str,
        name: str,
        ip: str | None,
        gw: str = DEFAULT_GW4,
        *,
        ip6: str | None = None,
        gw6: str = DEFAULT_GW6,
    ) -> Namespace:
        """A pod namespace behind `node`, reachable from the node by a host route to its address."""
        pod = self.add_namespace(name, "pod")
        host_if = self._free_ifname(node, "lxc" + name.replace(".", "-"))
        link = self.link(name, node, ifname_a="eth0", ifname_b=host_if)
        self.sysctl(node, {f"net.ipv4.conf.{host_if}.proxy_arp": "1"})
        for addr, gateway in ((ip, gw), (ip6, gw6)):
            if not addr:
                continue
            addr = _with_host_prefix(addr)
            host_addr = str(ipaddress.ip_interface(addr).ip)
            v = ["-6"] if _family(addr) == 6 else ["-4"]
            nodad = ["nodad"] if _family(addr) == 6 else []
            self._ip(name, *v, "addr", "add", addr, "dev", "eth0", *nodad)
            link.addrs_a.append(addr)
            self._ip(name, *v, "route", "replace", gateway, "dev", "eth0", "scope", "link")
            self._ip(name, *v, "route", "replace", "default", "via", gateway, "dev", "eth0")
            self._ip(node, *v, "addr", "replace", _with_host_prefix(gateway), "dev", host_if, *nodad)
            self._ip(node, *v, "route", "replace", _with_host_prefix(host_addr), "dev", host_if)
        return pod

    # -- links and routes
    def _free_ifname(self, ns: str, base: str) -> str:
        taken = set(self.namespaces[ns].ifaces)
        name = base[:IFNAMSIZ]
        n = 0
        while name in taken:
            n += 1
            suffix = str(n)
            name = base[: IFNAMSIZ - len(suffix)] + suffix
        return name

    def _next_eth(self, ns: str) -> str:
        taken = set(self.namespaces[ns].ifaces)
        n = 0
        while f"eth{n}" in taken:
            n += 1
        return f"eth{n}"

    def link(
        self,
        a: str,
        b: str,
        addr_a: str | Sequence[str] | None = None,
        addr_b: str | Sequence[str] | None = None,
        *,
        ifname_a: str | None = None,
        ifname_b: str | None = None,
        mtu: int | None = None,
    ) -> Link:
        """A veth between namespaces a and b (eth<N> on each side unless named); addresses with prefix."""
        ns_a, ns_b = self.namespaces[a], self.namespaces[b]
        if_a = ifname_a or self._next_eth(a)
        if_b = ifname_b or self._next_eth(b)
        for n in (if_a, if_b):
            if len(n) > IFNAMSIZ:
                raise ValueError(f"interface name {n!r} longer than {IFNAMSIZ} characters")
        if if_a in ns_a.ifaces or if_b in ns_b.ifaces:
            raise ValueError(f"interface name taken: {a}/{if_a} or {b}/{if_b}")
        # Created inside ns_a with its peer placed straight into ns_b: nothing appears in the host namespace.
        _run(["ip", "-n", ns_a.netns, "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b.netns])
        ns_a.ifaces.append(if_a)
        ns_b.ifaces.append(if_b)
        link = Link(a, b, if_a, if_b)
        for ns, ifname, addrs, out in ((a, if_a, addr_a, link.addrs_a), (b, if_b, addr_b, link.addrs_b)):
            if mtu:
                self._ip(ns, "link", "set", ifname, "mtu", str(mtu))
            for addr in _as_list(addrs):
                nodad = ["nodad"] if _family(addr) == 6 else []
                self._ip(ns, "addr", "add", addr, "dev", ifname, *nodad)
                out.append(addr)
            self._ip(ns, "link", "set", ifname, "up")
        self.links.append(link)
        log.info("event=veth_added a=%s/%s b=%s/%s", ns_a.netns, if_a, ns_b.netns, if_b)
        return link

    def add_route(self, ns: str, dst: str, via: str | None = None, *, dev: str | None = None) -> None:
        probe = via or (None if dst == "default" else dst)
        fam = "-6" if probe and ":" in probe else "-4"
        cmd = [fam, "route", "replace", dst]
        if via:
            cmd += ["via", via]
        if dev:
            cmd += ["dev", dev]
        self._ip(ns, *cmd)

    def sysctl(self, ns: str, settings: dict[str, str] | str, value: str | int | None = None) -> None:
        """Set sysctls inside the namespace: sysctl(ns, {"net.ipv4.ip_forward": "1"}) or sysctl(ns, key, value)."""
        if isinstance(settings, str):
            settings = {settings: str(value)}
        args = [f"{k}={v}" for k, v in settings.items()]
        _run(["ip", "netns", "exec", self.namespaces[ns].netns, "sysctl", "-qw", *args])

    def mac(self, ns: str, ifname: str) -> str:
        out = self._ip(ns, "-j", "link", "show", "dev", ifname).stdout
        return str(json.loads(out)[0]["address"])

    def ifindex(self, ns: str, ifname: str) -> int:
        out = self._ip(ns, "-j", "link", "show", "dev", ifname).stdout
        return int(json.loads(out)[0]["ifindex"])

    # -- commands
    def _ip(self, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
        return _run(["ip", "-n", self.namespaces[ns].netns, *args])

    def _argv(self, ns: str, cmd: str | Sequence[str]) -> list[str]:
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return ["ip", "netns", "exec", self.namespaces[ns].netns, *argv]

    def run(
        self,
        ns: str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace (a string goes through sh -c) and wait for it."""
        return _run(self._argv(ns, cmd), check=check, timeout=timeout, input=input)

    def end_closing(self, *namespaces: str) -> None:
        """Destroy the TCP sockets still closing or opening in these namespaces (ss -K): their
        retransmissions (a FIN after its service went, a SYN) would otherwise reach the data path
        seconds later and count in a later step's counters. Established and listening sockets
        stay. Every namespace when none is named."""
        for ns in namespaces or tuple(self.namespaces):
            self.run(ns, ["ss", "-K", "-t", "state", "fin-wait-1", "state", "closing", "state", "last-ack",
                          "state", "syn-sent", "state", "syn-recv"], check=False)

    def popen(self, ns: str, cmd: str | Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a background command in the namespace; it is stopped at teardown."""
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        kw.setdefault("stdin", subprocess.DEVNULL)
        # Own process group, so teardown can stop the command and its children by group id.
        kw["start_new_session"] = True
        proc = subprocess.Popen(self._argv(ns, cmd), **kw)
        self._procs.append(proc)
        log.debug("event=popen netns=%s pid=%d", self.namespaces[ns].netns, proc.pid)
        return proc

    # -- teardown
    def _stop_procs(self) -> None:
        for proc in self._procs:
            if proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3
        for proc in self._procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=3)
        self._procs.clear()

    def _kill_ns_pids(self, netns: str) -> None:
        _kill_ns_pids(netns)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if os.getpid() != self._owner_pid:
            log.warning("event=topology_close_skipped prefix=%s reason=forked_child owner=%d", self.prefix,
                        self._owner_pid)
            return
        errors: list[str] = []
        try:
            self._stop_procs()
        except Exception as exc:  # keep going: namespaces must go regardless
            errors.append(f"stopping processes: {exc}")
        for ns in reversed(list(self.namespaces.values())):
            try:
                self._kill_ns_pids(ns.netns)
                if netns_exists(ns.netns):
                    _run(["ip", "netns", "del", ns.netns])
                (OWNERS_DIR / ns.netns).unlink(missing_ok=True)
                _tidy_owners_dir(OWNERS_DIR)
                log.info("event=netns_deleted netns=%s", ns.netns)
            except Exception as exc:
                errors.append(f"deleting {ns.netns}: {exc}")
        with _live_lock:
            _live.pop(id(self), None)
        if errors:
            raise RuntimeError("topology teardown incomplete: " + "; ".join(errors))
