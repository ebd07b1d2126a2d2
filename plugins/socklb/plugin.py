"""The socklb plugin: loads the socket-LB programs, attaches them to a cgroup, keeps its own
maps (node addresses, per-socket reverse NAT) in step with services and node facts.

Each hook is a cgroup BPF link pinned at <bpf.pinPath>/links/socklb/cgroup-<cgroup id>/<hook>
(kpr.bpf.links): it outlives the agent, so pods' connections to ClusterIPs keep working
while no agent runs. A starting agent adopts the pinned links: when they already run the build
it would make (kpr.bpf.builds: same source, flags, kernel, bcc) it keeps their programs and
compiles nothing; otherwise it switches them to its newly loaded programs (BPF_LINK_UPDATE,
atomic). It attaches only what is missing, removes links of
hooks it no longer wants (bindProtection turned off) or of cgroups that are gone, and removes
copies of its programs attached the old way by an earlier run. Without cgroup links (or with
KPR_BPF_LINKS=off) it attaches with BPF_F_ALLOW_MULTI as before, puts the new program next to
the old one and then detaches the old one, so there is still one copy and no gap. Stop leaves
everything attached unless keepAttachedOnStop is false; `kpr cleanup` removes it.

The shared service maps are the core's ServiceMapWriter's (kpr_requires "servicemaps"); the
writer follows the bus on its own worker, so this plugin never writes them. What it does per
service is its own: when backends leave a frontend, reverse-NAT entries of sockets that were
sent to them are dropped, and with terminateConnections those sockets are destroyed.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from kpr import hookimpl
from kpr.bpf import abi, builds, links, percpu
from kpr.bpf import maps as M
from kpr.context import PluginContext
from kpr.servicemaps import WriterParams, writer_params
from kpr.model import FrontendType, NodeInfo, PluginStatus, Service, ServiceKey

from . import sockdiag
from .config import SockLBConfig

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "bpf" / "socklb.c"

# (program, program type, attach type). post_bind hooks only with bindProtection.
HOOKS: tuple[tuple[str, str, str], ...] = (
    ("sklb4_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    ("sklb6_connect", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    ("sklb4_sendmsg", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_SENDMSG"),
    ("sklb6_sendmsg", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_SENDMSG"),
    ("sklb4_recvmsg", "CGROUP_SOCK_ADDR", "CGROUP_UDP4_RECVMSG"),
    ("sklb6_recvmsg", "CGROUP_SOCK_ADDR", "CGROUP_UDP6_RECVMSG"),
    ("sklb4_peername", "CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME"),
    ("sklb6_peername", "CGROUP_SOCK_ADDR", "CGROUP_INET6_GETPEERNAME"),
)
BIND_HOOKS: tuple[tuple[str, str, str], ...] = (
    ("sklb4_postbind", "CGROUP_SOCK", "CGROUP_INET4_POST_BIND"),
    ("sklb6_postbind", "CGROUP_SOCK", "CGROUP_INET6_POST_BIND"),
)

# kpr_sock_stats slots in KPR_SOCK_ST_* order (lib/sock.h, via kpr.bpf.abi), each named by its
# C suffix in lower case, or by its published name (status, metrics) where that differs.
STATS = abi.counters(
    "KPR_SOCK_ST_",
    names={
        "SKIP_EXTERNAL": "skip_external_ip",
        "SKIP_SRCRANGE": "skip_source_ranges",
        "REVNAT_FAIL": "revnat_update_failed",
        "FAMILY": "family_mismatch",
    },
)

BPF_F_ALLOW_MULTI = 1 << 1  # share the cgroup hook with other agents' programs

# Pinned maps this plugin owns (lib/sock.h), next to the shared ones under bpf.pinPath.
REVNAT_MAP = "kpr_sock_revnat"
HOSTADDR_MAP = "kpr_sock_hostaddr"
STATS_MAP = "kpr_sock_stats"

# lib/sock.h's structs: fields positionally in header order (tests/test_abi.py pins the lists).
REVNAT_KEY = abi.packer("kpr_sock_revnat_key")  # cookie, backend addr, backend port (network order), pad, pad2
REVNAT_VAL = abi.packer("kpr_sock_revnat_val", skip=("pad",))  # dialled addr, port (network order), proto, rev_nat, netns

# A frontend as the reverse-NAT map sees it: (dialled address or None for NodePort, which is
# dialled at any node address or loopback, port in network order, protocol number).
FrontendMatch = tuple[bytes | None, int, int]
# A backend as the reverse-NAT map keys it: (address, port in network order).
BackendMatch = tuple[bytes, int]


def _frontends(service: Service, only: set[FrontendMatch] | None = None) -> dict[FrontendMatch, frozenset[BackendMatch]]:
    """A service's frontends and their backends as the reverse-NAT map sees them; with `only`,
    just the frontends in it (the rest's backends are not worked out)."""
    out: dict[FrontendMatch, set[BackendMatch]] = {}
    for fe in service.frontends:
        if fe.protocol.number not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            continue
        addr = None if fe.type is FrontendType.NODE_PORT else M.addr_to_bytes(fe.address)
        match = (addr, M.htons(fe.port), fe.protocol.number)
        if only is not None and match not in only:
            continue
        out.setdefault(match, set()).update((M.addr_to_bytes(b.address), M.htons(b.port)) for b in fe.backends)
    return {k: frozenset(v) for k, v in out.items()}


@dataclass
class _Attachment:
    prog: str
    attach_type: str
    fn: Any  # bcc BPF.Function, or builds.AdoptedProg (the pinned link's program, not compiled)
    prog_id: int
    record_id: int
    # The pinned link holding the program at its hook, and its fd while the agent runs;
    # link_fd -1: attached without a link (the fallback).
    link_pin: Path | None = None
    link_fd: int = -1
    action: str = ""  # created | adopted | updated | attached (fallback)


@dataclass
class _Counters:
    revnat_dropped: int = 0
    sockets_destroyed: int = 0
    destroy_errors: int = 0
    netns_not_found: int = 0
    errors: list[str] = field(default_factory=list)


class SockLB:
    """Instantiated once per agent by the plugin manager."""

    # kpr_start compiles and attaches without the source: the agent runs the source's first
    # pass meanwhile (kpr.daemon.STARTS_WITHOUT_SOURCE), while LLVM leaves the GIL free.
    starts_without_source = True

    @property
    def starts_off_the_gil(self) -> bool:
        """kpr.daemon.STARTS_OFF_THE_GIL: with the program cache on, a compile runs in
        kpr.bpf.compile_child and the rest of the start is short (adopting links, loading a
        cache entry: the verifier's time is in the kernel); with it off, LLVM's Python-side
        steps in the agent would wait on the first pass for the GIL."""
        return self.context is not None and bool(self.context.config.bpf.program_cache)

    def __init__(self) -> None:
        self.cfg: SockLBConfig | None = None
        self.context: PluginContext | None = None
        self.pin_path: Path | None = None
        self.params = WriterParams()
        self.cgroup: Path | None = None
        self.host_netns_cookie = 0
        self._host_ns_fd = -1
        self._bpf: Any = None
        self._compiler: Any = None  # kpr.bpf.progcache.CompileChild started at configure, until the start
        self._cg_fd = -1
        self._attached: list[_Attachment] = []
        self._maps: dict[str, M.BpfMap] = {}
        # The services delivered, as delivered: the bus hands every plugin the store's own
        # frozen objects, so keeping them costs nothing; their frontend -> backend sets are
        # worked out when a change needs them (40 MB at 20k services if kept).
        self._services: dict[ServiceKey, Service] = {}
        self._hostaddrs: set[bytes] = set()
        self._lock = threading.RLock()
        self._c = _Counters()
        self._destroy_unsupported = ""
        self._set_retval = True
        self._fallback = ""  # why hooks are attached without links ("" : with links)
        self._build = ""  # "compiled"; "cached": loaded from the program cache; "adopted": the pinned links ran this build already
        # More compiler flags (tests build a changed program, as an upgrade would bring).
        self.extra_cflags: list[str] = []

    # ------------------------------------------------------------------ configuration

    @hookimpl
    def kpr_config_schema(self) -> type[pydantic.BaseModel]:
        return SockLBConfig

    @hookimpl
    def kpr_requires(self) -> list[str]:
        return ["servicemaps"]

    @hookimpl
    def kpr_configure(self, config: SockLBConfig, context: PluginContext) -> None:
        self.cfg = config
        self.context = context
        self.pin_path = Path(context.config.bpf.pin_path)
        # The shared maps' settings (algorithm, Maglev size) come from every enabled plugin's
        # section; the programs are compiled with the same values the writer uses.
        self.params = writer_params(context.config)
        # A first start compiles (kpr.bpf.progcache's child): started now, its interpreter and
        # libbcc load while the agent starts its source and the writer.
        # (kpr_start closes it, used or not, however it ends; never started, the plugin leaves
        # it to the agent's exit: the child ends when its stdin does)
        self._close_compiler()
        if self._compile_likely(context):
            from kpr.bpf.progcache import CompileChild

            try:
                self._compiler = CompileChild()
            except OSError as exc:  # started at the compile instead
                log.info("event=socklb_compile_child_not_started error=%r", exc)

    @staticmethod
    def _compile_likely(context: PluginContext) -> bool:
        """A compile in the child (the program cache on) with no build pinned to adopt and no
        cache entry to load (kpr.bpf.progcache.compile_likely)."""
        from kpr.bpf.progcache import compile_likely

        return bool(context.config.bpf.program_cache) and compile_likely(context.config)

    def _close_compiler(self) -> None:
        compiler, self._compiler = self._compiler, None
        if compiler is not None:
            compiler.close()

    def _algorithm_note(self) -> str:
        # The writer marks each service entry random or Maglev (default from this key, per
        # service from the annotation); the hooks follow the entry's flag.
        return f"{self.params.algorithm} unless a service is annotated service.kpr.io/lb-algorithm"

    # ------------------------------------------------------------------ start / stop

    @hookimpl
    def kpr_start(self, context: PluginContext) -> None:
        try:
            self._start(context)
        finally:
            self._close_compiler()  # (used, or not needed: adopted, cached, or the start failed)

    def _start(self, context: PluginContext) -> None:
        from kpr.bpf import fs, probes
        from kpr.bpf.cleanup import record_attachment
        from kpr.bpf.inline import inline_includes
        from kpr.bpf.loader import load_prog
        from kpr.bpf.progcache import CachedModule, load_programs

        cfg, pin = self.cfg, self.pin_path
        assert cfg is not None and pin is not None, "kpr_configure first"
        if not any(m == pin.resolve() or m in pin.resolve().parents for m in fs.find_mounts("bpf")):
            raise OSError(f"bpf.pinPath {pin} is not on a bpffs (mount -t bpf bpf /sys/fs/bpf)")
        self.cgroup = Path(cfg.cgroup_path) if cfg.cgroup_path else fs.ensure_cgroup2()
        real = self.cgroup.resolve()
        if not (real / "cgroup.procs").exists() or not any(m == real or m in real.parents for m in fs.find_mounts("cgroup2")):
            raise OSError(f"plugins.socklb.cgroupPath: {self.cgroup} is not a cgroup v2 directory")
        hooks = HOOKS + (BIND_HOOKS if cfg.bind_protection else ())
        adopted: dict[str, builds.AdoptedProg] | None = None
        try:
            # "The host" is the namespace the agent runs in; remember it for node-address
            # refreshes that arrive on other threads.
            self._host_ns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            self.host_netns_cookie = sockdiag.current_netns_cookie()
            if cfg.terminate_connections:
                self._destroy_unsupported = sockdiag.destroy_unsupported()
                if self._destroy_unsupported:
                    log.error("event=socklb_terminate_unsupported error=%s", self._destroy_unsupported)
            pin.mkdir(parents=True, exist_ok=True)

            def cflags(set_retval: bool) -> list[str]:
                return self.params.cflags(pin) + [
                    f"-DKPR_SOCK_HOST_NETNS={self.host_netns_cookie}ULL",
                    f"-DKPR_SOCK_HOST_ONLY={int(cfg.host_namespace_only)}",
                    f"-DKPR_SOCK_REVNAT_MAX={cfg.reverse_nat_map_size}",
                    f"-DKPR_SOCK_HAVE_SET_RETVAL={int(set_retval)}",
                    *self.extra_cflags,
                ]

            text = inline_includes(SOURCE.read_text(), [SOURCE.parent], label=str(SOURCE))
            self._cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY)
            link_dir = self._link_dir()
            # The pinned links already run this very build (a restart without a change): keep
            # them as they are and skip the compile (kpr.bpf.builds). The set_retval probe
            # compiles too; its answer depends only on the kernel, which a build's digest
            # covers, so a build made with either answer tells it.
            guesses = {builds.digest(text, cflags(v)): v for v in (True, False)}
            found = builds.adopt(pin, list(guesses), {prog: link_dir / atype.lower() for prog, _t, atype in hooks})
            if found is not None:
                build, adopted = found
                self._set_retval = guesses[build]
            else:
                self._set_retval = probes.have_helper("set_retval", "CGROUP_SOCK_ADDR")
                build = builds.digest(text, cflags(self._set_retval))
                # no links to adopt (a reboot emptied bpffs): the programs an earlier start
                # compiled, from agent.stateDir's cache when it has this build (kpr.bpf.progcache)
                self._bpf = load_programs(text, [(p, t, a) for p, t, a in hooks], cflags=cflags(self._set_retval),
                                          name=str(SOURCE), cache=self._program_cache(context),
                                          in_child=self._compiler or True)
            self._close_compiler()  # (used, or not needed: adopted or cached; before the attach)
            if not self._set_retval:
                log.warning("event=socklb_no_set_retval effect=refusals_fail_with_EPERM")
            self._build = (
                "adopted" if adopted is not None
                else "cached" if isinstance(self._bpf, CachedModule) and not self._bpf.compiled else "compiled"
            )
            for name in (REVNAT_MAP, HOSTADDR_MAP, STATS_MAP):
                self._maps[name] = M.BpfMap.open_pinned(pin / name)
            self._sync_hostaddrs(context.node)
            for prog, ptype, atype in hooks:
                fn = adopted.pop(prog) if adopted is not None else load_prog(self._bpf, prog, ptype, attach_type=atype)
                # Tracked before it is recorded: an attachment outlives this process.
                a = _Attachment(prog, atype, fn, M.prog_info(fn.fd).id, 0)
                self._attach(a, link_dir)
                self._attached.append(a)
                a.record_id = record_attachment(
                    pin, "cgroup", {"cgroup": str(self.cgroup), "attach_type": atype}, prog, prog_id=a.prog_id
                )
                self._drop_other_copies(a)
            if self._bpf is not None:
                builds.record(pin, build, [a.prog_id for a in self._attached])
            self._sweep_links(link_dir, {atype.lower() for _p, _t, atype in hooks})
        except BaseException:
            # What is attached stays attached (an adopted link still runs the last good
            # program); only this process's handles go.
            for p in (adopted or {}).values():
                p.close()
            self._teardown(detach=False)
            raise
        log.info(
            "event=socklb_started cgroup=%s hooks=%d links=%s build=%s host_netns_cookie=%d host_only=%s "
            "bind_protection=%s terminate_connections=%s set_retval=%s",
            self.cgroup, len(self._attached), self._actions(), self._build, self.host_netns_cookie,
            cfg.host_namespace_only,
            cfg.bind_protection, cfg.terminate_connections, self._set_retval,
        )

    def _program_cache(self, context: PluginContext) -> Any:
        from kpr.bpf.progcache import CACHE_DIR, ProgramCache

        config = context.config
        if not config.bpf.program_cache:
            return None
        return ProgramCache(Path(config.agent.state_dir) / CACHE_DIR, self.pin_path)

    def _link_dir(self) -> Path:
        assert self.pin_path is not None
        return self.pin_path / links.LINKS_DIR / "socklb" / f"cgroup-{os.fstat(self._cg_fd).st_ino}"

    def _actions(self) -> str:
        counts: dict[str, int] = {}
        for a in self._attached:
            counts[a.action] = counts.get(a.action, 0) + 1
        return ",".join(f"{k}:{v}" for k, v in sorted(counts.items())) or "-"

    def _attach(self, a: _Attachment, link_dir: Path) -> None:
        """Put a's program at its hook: through the pinned link (adopted, updated or created),
        or, where the kernel has no cgroup links, attached the old way (BPF_F_ALLOW_MULTI)."""
        from kpr.bpf.loader import attach_type_value

        value = attach_type_value(a.attach_type)
        pin = link_dir / a.attach_type.lower()
        try:
            a.link_fd, a.action, _info = links.ensure(pin, a.fn.fd, links.Hook.cgroup(self._cg_fd, value))
            a.link_pin = pin
            return
        except links.LinkUnsupported as exc:
            if not self._fallback:
                log.warning("event=socklb_links_unavailable error=%s effect=attached_without_links", exc)
            self._fallback = str(exc)
        except OSError as exc:
            raise OSError(f"attaching {a.prog} to {self.cgroup} ({a.attach_type}): {exc}") from None
        # (libbpf, as bcc's attach_func does: a program loaded from the cache is no bcc Function)
        rc = M.libbpf().bpf_prog_attach(a.fn.fd, self._cg_fd, value, BPF_F_ALLOW_MULTI)
        if rc < 0:
            raise OSError(-rc, f"attaching {a.prog} to {self.cgroup} ({a.attach_type}): {os.strerror(-rc)}")
        a.action = "attached"

    def _drop_other_copies(self, a: _Attachment) -> None:
        """Detach every other copy of a's program at its hook on this cgroup: an earlier run's,
        attached without a link or through a link pinned elsewhere. Same program name only."""
        from kpr.bpf.loader import attach_type_value

        value = attach_type_value(a.attach_type)
        held: dict[int, list[links.LinkInfo]] | None = None
        for pid in links.query(self._cg_fd, value):
            if pid == a.prog_id or links.prog_name(pid) != a.prog[:15]:
                continue
            if held is None:
                held = links.links_of_progs()
            via = [li for li in held.get(pid, []) if li.kind == "cgroup"]
            try:
                if via:
                    for li in via:
                        links.detach_link_id(li.id)
                else:
                    fd = M.check_rc(M.libbpf().bpf_prog_get_fd_by_id(pid), f"bpf_prog_get_fd_by_id {pid}")
                    try:
                        M.check_rc(M.libbpf().bpf_prog_detach2(fd, self._cg_fd, value), f"bpf_prog_detach2 {a.prog}")
                    finally:
                        os.close(fd)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            log.info("event=socklb_old_copy_detached hook=%s prog_id=%d via=%s", a.attach_type, pid,
                     "link" if via else "attach")

    def _sweep_links(self, link_dir: Path, wanted: set[str]) -> None:
        """Links of hooks this config does not want on our cgroup, and links whose cgroup is gone."""
        root = link_dir.parent

        def keep(p: Path, li: links.LinkInfo) -> bool:
            if p.parent == link_dir:
                return p.name in wanted and not li.defunct
            return not li.defunct  # another cgroup's: kept while it exists (`kpr cleanup` removes it)

        for line in links.sweep(root, keep):
            log.info("event=socklb_link_swept what=%r", line)
        from kpr.bpf.cleanup import attachments, forget_attachment

        for rec in attachments(self.pin_path):
            t = rec["target"]
            name = str(t.get("attach_type_name", "")).lower()
            if rec["kind"] == "cgroup" and t.get("cgroup") == str(self.cgroup) and name and name not in wanted:
                forget_attachment(self.pin_path, rec["id"])

    @hookimpl
    def kpr_stop(self, context: PluginContext) -> None:
        keep = bool(self.cfg is None or self.cfg.keep_attached_on_stop)
        self._teardown(detach=not keep)
        log.info("event=socklb_stopped cgroup=%s detached=%s", self.cgroup, not keep)

    def _teardown(self, *, detach: bool = True) -> None:
        """Close this process's handles; with `detach`, take the programs off their hooks too.
        Pinned maps stay (reverse NAT keeps working across a restart)."""
        from kpr.bpf.cleanup import forget_attachment
        from kpr.bpf.loader import attach_type_value

        with self._lock:
            errors = []
            for a in reversed(self._attached):
                if detach:
                    if a.link_pin is not None:
                        try:
                            links.release(a.link_pin)
                        except OSError as exc:
                            errors.append(f"detach {a.prog}: {exc}")
                            continue
                    else:
                        rc = M.libbpf().bpf_prog_detach2(a.fn.fd, self._cg_fd, attach_type_value(a.attach_type))
                        if rc < 0 and -rc != errno.ENOENT:  # ENOENT: `kpr cleanup` detached it already
                            errors.append(f"detach {a.prog}: {os.strerror(-rc)}")
                            continue
                    try:
                        if a.record_id:
                            forget_attachment(self.pin_path, a.record_id)
                    except OSError as exc:
                        errors.append(f"forget {a.prog}: {exc}")
                if a.link_fd >= 0:
                    os.close(a.link_fd)
                    a.link_fd = -1
                if isinstance(a.fn, builds.AdoptedProg):
                    a.fn.close()
            self._attached.clear()
            for m in self._maps.values():
                m.close()
            self._maps.clear()
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            self._close_compiler()
            for attr in ("_cg_fd", "_host_ns_fd"):
                fd = getattr(self, attr)
                if fd >= 0:
                    os.close(fd)
                    setattr(self, attr, -1)
            if errors:
                raise OSError("socklb teardown: " + "; ".join(errors))

    # ------------------------------------------------------------------ node addresses

    @hookimpl
    def kpr_node_changed(self, node: NodeInfo) -> None:
        self._sync_hostaddrs(node)

    def _host_addresses(self) -> set[str]:
        """Global addresses of every interface in the host namespace (read in that namespace)."""

        def read() -> set[str]:
            out = set()
            for text in sockdiag.interface_addresses():
                ip = ipaddress.ip_address(text)
                if not (ip.is_loopback or ip.is_link_local):
                    out.add(str(ip))
            return out

        return sockdiag.run_in_netns(f"/proc/self/fd/{self._host_ns_fd}", read)

    def _sync_hostaddrs(self, node: NodeInfo) -> None:
        """NodePorts answer on, and local ExternalIPs are, the node's addresses and every other
        address the host namespace holds."""
        with self._lock:
            m = self._maps.get(HOSTADDR_MAP)
            if m is None:
                return
            addrs = set(node.addresses)
            try:
                addrs |= self._host_addresses()
            except Exception as exc:  # the configured addresses still work
                log.warning("event=socklb_host_addresses_unreadable error=%r", exc)
            want = {M.addr_to_bytes(a) for a in addrs}
            gone = [k for k in m.keys() if k not in want]
            m.update_many(sorted(want), [M.U32.pack(1)] * len(want))
            m.delete_many(gone)
            self._hostaddrs = want
            log.info("event=socklb_host_addresses count=%d", len(want))

    # ------------------------------------------------------------------ services

    @hookimpl
    def kpr_service_upsert(self, service: Service) -> None:
        with self._lock:
            previous = self._services.get(service.key)
            self._services[service.key] = service
            if previous is None or previous == service:
                return
            new, old = _frontends(service), _frontends(previous)
            removed = {fe: gone for fe, bes in old.items() if (gone := bes - new.get(fe, frozenset()))}
            if removed:
                self._purge(removed, service.key)

    @hookimpl
    def kpr_service_delete(self, key: ServiceKey) -> None:
        with self._lock:
            previous = self._services.pop(key, None)
            old = _frontends(previous) if previous is not None else None
            if old:
                self._purge(old, key)

    @hookimpl
    def kpr_sync_complete(self) -> None:
        # Backends that left while no agent ran: whatever the delivered state does not offer.
        # Only the frontends some socket in the map dialled are worked out: every service's
        # backend set was 200k tuples and addresses at 20k services, made and freed at once
        # just before ready, and the heap they spread over stayed (about 30 MB of RSS).
        with self._lock:
            m = self._maps.get(REVNAT_MAP)
            items = m.items() if m is not None else []
            if not items:
                return
            dialled: set[FrontendMatch] = set()
            for _k, v in items:
                faddr, fport, proto, _rev_nat, _netns = REVNAT_VAL.unpack(v)
                dialled.update(((faddr, fport, proto), (None, fport, proto)))
            valid: dict[FrontendMatch, set[BackendMatch]] = {}
            for svc in self._services.values():
                for fe, bes in _frontends(svc, dialled).items():
                    valid.setdefault(fe, set()).update(bes)
            self._purge(None, None, keep=valid, items=items)

    def _purge(
        self,
        removed: dict[FrontendMatch, frozenset[BackendMatch]] | None,
        key: ServiceKey | None,
        *,
        keep: dict[FrontendMatch, set[BackendMatch]] | None = None,
        items: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Drop reverse-NAT entries of sockets sent to removed backends (or, with `keep`, to any
        backend not kept); with terminateConnections, destroy those sockets too. `items`: the
        map's entries when the caller read them already."""
        m = self._maps.get(REVNAT_MAP)
        if m is None:
            return
        stale: list[bytes] = []
        doomed: dict[int, dict[tuple[int, bytes, int], set[int]]] = {}  # netns -> (proto, addr, port) -> cookies
        for k, v in m.items() if items is None else items:
            cookie, baddr, bport, _, _ = REVNAT_KEY.unpack(k)
            faddr, fport, proto, _rev_nat, netns = REVNAT_VAL.unpack(v)
            be = (baddr, bport)
            matches = [(faddr, fport, proto), (None, fport, proto)]
            if removed is not None:
                hit = any(be in removed.get(fe, ()) for fe in matches)
            else:
                known = [fe for fe in matches if fe in keep]
                hit = bool(known) and not any(be in keep[fe] for fe in known)
            if hit:
                stale.append(k)
                doomed.setdefault(netns, {}).setdefault((proto, baddr, M.ntohs(bport)), set()).add(cookie)
        if not stale:
            return
        if self.cfg.terminate_connections:
            self._terminate(doomed, removed)
        m.delete_many(stale)
        self._c.revnat_dropped += len(stale)
        log.info("event=socklb_revnat_dropped service=%s entries=%d", key or "-", len(stale))

    # ------------------------------------------------------------------ terminateConnections

    def _terminate(
        self,
        doomed: dict[int, dict[tuple[int, bytes, int], set[int]]],
        removed: dict[FrontendMatch, frozenset[BackendMatch]] | None,
    ) -> None:
        if self._destroy_unsupported:
            return
        # No wait for the maps: the writer stage applied this change before the hook ran
        # (kpr.pipeline), so a client that reconnects at once gets another backend.
        paths = sockdiag.find_netns(doomed)
        for netns, groups in doomed.items():
            path = paths.get(netns)
            if path is None:
                self._c.netns_not_found += 1
                log.info("event=socklb_netns_gone netns_cookie=%d sockets=%d", netns, sum(map(len, groups.values())))
                continue
            targets = [sockdiag.Target(p, a, port, frozenset(c)) for (p, a, port), c in groups.items()]
            try:
                n = sockdiag.run_in_netns(path, lambda t=targets: sockdiag.destroy_in_current_netns(t))
            except sockdiag.DestroyUnsupported as exc:
                self._destroy_unsupported = str(exc)
                log.error("event=socklb_terminate_unsupported error=%s", exc)
                return
            except OSError as exc:
                self._c.destroy_errors += 1
                self._note_error(f"terminating sockets in {path}: {exc}")
                continue
            self._c.sockets_destroyed += n
            log.info("event=socklb_sockets_destroyed netns=%s count=%d", path, n)

    # ------------------------------------------------------------------ status

    def _note_error(self, text: str) -> None:
        log.warning("event=socklb_error error=%s", text)
        self._c.errors = (self._c.errors + [text])[-10:]

    def stats(self) -> dict[str, int]:
        """The datapath's counters, summed over CPUs ({} when not started)."""
        m = self._maps.get(STATS_MAP)
        if m is None:
            return {}
        try:
            return dict(zip(STATS, percpu.u64_sums(m, len(STATS))))
        except Exception as exc:  # stopping under our feet; status must not fail for it
            log.debug("event=socklb_stats_unreadable error=%r", exc)
            return {}

    @hookimpl
    def kpr_status(self) -> PluginStatus:
        # No lock: a termination pass may hold it for seconds, and status must stay quick.
        attached = [f"{a.attach_type}:{a.prog}" for a in self._attached]
        counters: dict[str, float] = {k: float(v) for k, v in self.stats().items()}
        counters.update(
            hooks_attached=float(len(attached)),
            revnat_dropped=float(self._c.revnat_dropped),
            sockets_destroyed=float(self._c.sockets_destroyed),
            destroy_errors=float(self._c.destroy_errors),
            netns_not_found=float(self._c.netns_not_found),
        )
        healthy = bool(attached)
        msg = f"{len(attached)} hooks on {self.cgroup}" if healthy else "not attached"
        if self.cfg is not None and self.cfg.terminate_connections and self._destroy_unsupported:
            msg += f"; terminateConnections cannot work: {self._destroy_unsupported}"
        if not self._set_retval:
            msg += "; refusals fail with EPERM (no bpf_set_retval)"
        if self._fallback:
            msg += f"; attached without BPF links ({self._fallback})"
        details: dict[str, object] = {
            "cgroup": str(self.cgroup) if self.cgroup else None,
            "hooks": attached,
            "links": {a.attach_type: {"pin": str(a.link_pin) if a.link_pin else None, "action": a.action}
                      for a in list(self._attached)},
            "linksFallback": self._fallback,
            "build": self._build,
            "hostNetnsCookie": self.host_netns_cookie,
            "hostAddresses": sorted(M.bytes_to_addr(a) for a in self._hostaddrs),
            "terminateConnections": {
                "enabled": bool(self.cfg and self.cfg.terminate_connections),
                "supported": not self._destroy_unsupported,
                "reason": self._destroy_unsupported,
            },
            "algorithm": self._algorithm_note(),
            "errors": list(self._c.errors),
        }
        return PluginStatus(healthy=healthy, message=msg, counters=counters, details=details)
