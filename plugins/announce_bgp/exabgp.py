"""ExaBGP as a managed child: its config file, its commands, and a supervisor that restarts it.

ExaBGP 5 has no library API, so kpr runs `exabgp server CONF` and talks to it through the
process API: ExaBGP starts bridge.py, which relays between ExaBGP's pipes and the agent's unix
socket (speaker.py). The supervisor restarts ExaBGP with exponential backoff whenever it
exits; the speaker then re-announces the desired routes to the new instance.
"""

from __future__ import annotations

import base64
import collections
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from .config import AnnounceBGPConfig, PeerConfig
from .routes import NEXT_HOP_SELF, Attrs

log = logging.getLogger(__name__)

BRIDGE = Path(__file__).resolve().parent / "bridge.py"
PROCESS_NAME = "kpr-bridge"
# The environment variable that carries the per-start token to the bridge.
TOKEN_ENV = "KPR_BGP_BRIDGE_TOKEN"

# ExaBGP's settings, fixed by kpr: it runs in the foreground as our child, keeps root (its
# helper must reach the agent's root-only socket), logs to stdout for the supervisor to read,
# never listens for incoming sessions, and answers every command so acks can be matched.
EXABGP_ENV = {
    "exabgp.daemon.daemonize": "false",
    "exabgp.daemon.drop": "false",
    "exabgp.daemon.pid": "",
    "exabgp.log.destination": "stdout",
    "exabgp.log.level": "INFO",
    "exabgp.log.short": "true",
    "exabgp.api.cli": "false",
    "exabgp.api.ack": "true",
    "exabgp.api.encoder": "json",
    "exabgp.api.respawn": "true",
    "exabgp.api.terminate": "false",
    "exabgp.tcp.bind": "",
    "exabgp.tcp.attempts": "0",
}

NETNS_DIR = Path("/run/netns")
# Seconds between looks for a network namespace that does not exist yet.
NETNS_POLL = 0.25

FAMILY_NAMES = {"ipv4": "ipv4 unicast", "ipv6": "ipv6 unicast"}


class ExaBGPMissing(RuntimeError):
    """No usable exabgp program; the message says where kpr looked and how to install it."""


class ConfigRejected(RuntimeError):
    """`exabgp validate` refused the generated config; the message has its output."""


def find_exabgp(configured: str = "") -> str:
    if configured:
        path = configured if "/" in configured else shutil.which(configured)
        if path and os.access(path, os.X_OK):
            return path
        raise ExaBGPMissing(f"plugins.announce_bgp.exabgp: {configured!r} is not an executable program")
    # The venv the agent runs from first: `pip install kpr[bgp]` puts exabgp there.
    beside = Path(sys.executable).parent / "exabgp"
    if os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("exabgp")
    if found:
        return found
    raise ExaBGPMissing(
        f"exabgp not found (looked in {beside.parent} and on PATH): install it with "
        "`pip install 'kpr[bgp]'` (ExaBGP 5) or set plugins.announce_bgp.exabgp"
    )


def exabgp_version(exabgp: str, timeout: float = 20) -> str:
    res = subprocess.run([exabgp, "version"], capture_output=True, text=True, timeout=timeout, env=_env())
    for line in res.stdout.splitlines():
        if line.startswith("ExaBGP"):
            return line.split(":", 1)[1].strip()
    raise ExaBGPMissing(f"{exabgp} does not look like ExaBGP: `exabgp version` printed {res.stdout.strip()[:200]!r}")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().startswith("exabgp")}
    env.update(EXABGP_ENV)
    env.update(extra or {})
    return env


# --- config file ---------------------------------------------------------------------------


def route_source(address: str, netns: str = "") -> str | None:
    """The address the kernel would send from towards `address` (in `netns`), or None.

    ExaBGP needs it as the neighbor's local-address: without one, its "next-hop self" is the
    router id for IPv4 routes and an error for IPv6 ones.
    """
    argv = ["ip", *(["-n", netns] if netns else []), "-j", "route", "get", address]
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        routes = json.loads(res.stdout) if res.returncode == 0 and res.stdout.strip() else []
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    for r in routes:
        if r.get("type", "unicast") == "unicast" and r.get("prefsrc"):
            return str(r["prefsrc"])
    return None


def _neighbor_block(peer: PeerConfig, cfg: AnnounceBGPConfig, router_id: str, local: str | None) -> list[str]:
    lines = [
        f"neighbor {peer.address} {{",
        f"    router-id {router_id};",
        f"    local-as {cfg.local_asn};",
        f"    peer-as {peer.asn};",
        f"    hold-time {peer.hold_time};",
    ]
    if peer.port != 179:
        lines.append(f"    connect {peer.port};")
    local = peer.source_address or local
    if local:
        lines.append(f"    local-address {local};")
    if peer.password is not None:
        # base64 keeps any character of the password from reaching ExaBGP's tokenizer.
        encoded = base64.b64encode(peer.password.encode()).decode()
        lines += ["    md5-base64 true;", f'    md5-password "{encoded}";']
    if peer.multihop is not None:
        lines.append(f"    outgoing-ttl {peer.multihop};")
    # End-of-RIB is sent by the agent once its routes are in, so a router that kept our
    # routes across a restart (graceful restart) does not flush them before they are back.
    lines.append("    manual-eor true;")
    if cfg.graceful_restart_time:
        lines += ["    capability {", f"        graceful-restart {cfg.graceful_restart_time};", "    }"]
    lines.append("    family {")
    lines += [f"        {FAMILY_NAMES[f]};" for f in peer.address_families]
    lines.append("    }")
    lines += ["    api {", f"        processes [ {PROCESS_NAME} ];", "        neighbor-changes;", "    }", "}"]
    return lines


def render_config(
    cfg: AnnounceBGPConfig,
    router_id: str,
    socket_path: str,
    local_addresses: Mapping[str, str | None] | None = None,
    python: str = sys.executable,
) -> str:
    """ExaBGP's config: the bridge process and one neighbor per peer (no static routes).

    local_addresses maps peer addresses to the source address towards them (route_source),
    for peers without a configured sourceAddress.
    """
    local_addresses = local_addresses or {}
    for part in (python, str(BRIDGE), socket_path):
        if any(c.isspace() or c in ";\"'{}" for c in part):
            raise ValueError(f"path {part!r} cannot be passed to ExaBGP's run line (spaces or quotes)")
    lines = [
        "# Generated by kpr (plugins.announce_bgp); rewritten at every start.",
        f"process {PROCESS_NAME} {{",
        f"    run {python} {BRIDGE} {socket_path};",
        "    encoder json;",
        "}",
        "",
    ]
    for peer in cfg.peers:
        lines += _neighbor_block(peer, cfg, router_id, local_addresses.get(peer.address))
        lines.append("")
    return "\n".join(lines)


def validate_config(exabgp: str, path: Path, timeout: float = 30) -> None:
    res = subprocess.run([exabgp, "validate", str(path)], capture_output=True, text=True, timeout=timeout, env=_env())
    if res.returncode != 0:
        out = (res.stdout + res.stderr).strip().splitlines()
        raise ConfigRejected(f"exabgp validate rejected {path}: " + " | ".join(out[-8:]))


# --- process API commands ------------------------------------------------------------------


def announce_command(peer: str, prefix: str, attrs: Attrs) -> str:
    parts = [f"neighbor {peer} announce route {prefix}", f"next-hop {attrs.next_hop if attrs.next_hop != NEXT_HOP_SELF else 'self'}"]
    if attrs.communities:
        parts.append(f"community [ {' '.join(attrs.communities)} ]")
    if attrs.large_communities:
        parts.append(f"large-community [ {' '.join(attrs.large_communities)} ]")
    if attrs.local_preference is not None:
        parts.append(f"local-preference {attrs.local_preference}")
    if attrs.med is not None:
        parts.append(f"med {attrs.med}")
    return " ".join(parts)


def withdraw_command(peer: str, prefix: str) -> str:
    return f"neighbor {peer} withdraw route {prefix}"


def eor_commands(peer: str, families: Iterable[str]) -> list[str]:
    return [f"neighbor {peer} announce eor {FAMILY_NAMES[f]}" for f in families]


# --- supervisor ----------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the agent is killed outright, ExaBGP gets SIGTERM and closes its sessions the
    # graceful-restart way instead of announcing stale routes for ever.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except OSError:
        pass


@dataclass
class Backoff:
    first: float = 0.5
    maximum: float = 30.0
    # A run at least this long counts as healthy: the next failure starts from `first`.
    stable: float = 30.0


class Supervisor:
    """Runs `exabgp server CONF` (inside `netns` when set) and restarts it when it exits."""

    def __init__(
        self,
        exabgp: str,
        conf_path: Path,
        *,
        netns: str = "",
        on_spawn: Callable[[str], None] = lambda token: None,
        on_exit: Callable[[int], None] = lambda rc: None,
        prepare: Callable[[], None] = lambda: None,
        recheck: Callable[[], bool] = lambda: False,
        recheck_interval: float = 10.0,
        backoff: Backoff | None = None,
        name: str = "exabgp",
    ) -> None:
        self.exabgp = exabgp
        self.conf_path = conf_path
        self.netns = netns
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        # Called before every start (writes the config), and periodically while ExaBGP runs
        # (True: the config is out of date, restart).
        self.prepare = prepare
        self.recheck = recheck
        self.recheck_interval = recheck_interval
        self.backoff = backoff or Backoff()
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        # Starts after the first (crashes and deliberate restarts), and unexpected exits.
        self.restarts = 0
        self.crashes = 0
        self.starts = 0
        self.last_exit: int | None = None
        self.last_error = ""
        self.output: collections.deque[str] = collections.deque(maxlen=40)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._restart_now = False

    @property
    def argv(self) -> list[str]:
        base = [self.exabgp, "server", str(self.conf_path)]
        return ["ip", "netns", "exec", self.netns, *base] if self.netns else base

    @property
    def pid(self) -> int | None:
        p = self.proc
        return p.pid if p is not None and p.poll() is None else None

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"kpr-{self.name}", daemon=True)
        self._thread.start()

    def _spawn(self) -> subprocess.Popen[bytes]:
        token = secrets.token_hex(8)
        self.on_spawn(token)
        proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=_env({TOKEN_ENV: token}),
            # Its own process group, so stop() reaches the bridge too.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1
        log.info("exabgp.started pid=%d netns=%s conf=%s", proc.pid, self.netns or "-", self.conf_path)
        threading.Thread(target=self._drain, args=(proc,), name=f"kpr-{self.name}-log", daemon=True).start()
        return proc

    def _drain(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.output.append(line)
            log.debug("exabgp.output pid=%d line=%s", proc.pid, line)

    def netns_missing(self) -> bool:
        return bool(self.netns) and not (NETNS_DIR / self.netns).exists()

    def _wait_for_netns(self) -> bool:
        """A VRF or management namespace may be created after the agent: wait for it."""
        if not self.netns_missing():
            return True
        self.last_error = f"network namespace {self.netns!r} does not exist (waiting for it)"
        log.warning("exabgp.netns_missing netns=%s: waiting for it", self.netns)
        while self.netns_missing():
            if self._stop.wait(NETNS_POLL):
                return False
        log.info("exabgp.netns_appeared netns=%s", self.netns)
        return True

    def _run(self) -> None:
        delay = self.backoff.first
        while not self._stop.is_set():
            if not self._wait_for_netns():
                break
            started = time.monotonic()
            try:
                self.prepare()
                with self._lock:
                    if self._stop.is_set():
                        break
                    self.proc = self._spawn()
                proc = self.proc
            except Exception as e:
                self.last_error = f"cannot start exabgp: {e}"
                log.error("exabgp.start_failed error=%s", e)
            else:
                next_check = time.monotonic() + self.recheck_interval
                while proc.poll() is None and not self._stop.wait(0.1):
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + self.recheck_interval
                        if self._recheck():
                            self.restart()
                if self._stop.is_set():
                    break
                rc = proc.wait()
                self.last_exit = rc
                tail = " | ".join(list(self.output)[-5:])
                if self._restart_now:
                    log.info("exabgp.stopped_for_restart pid=%d rc=%d", proc.pid, rc)
                else:
                    self.crashes += 1
                    self.last_error = f"exabgp exited with {rc}: {tail}"
                    log.warning("exabgp.exited pid=%d rc=%d last_output=%s", proc.pid, rc, tail)
                try:
                    self.on_exit(rc)
                except Exception:
                    log.exception("exabgp.on_exit_failed")
            if time.monotonic() - started >= self.backoff.stable or self._restart_now:
                delay = 0.0 if self._restart_now else self.backoff.first
                self._restart_now = False
            log.info("exabgp.restart_in seconds=%.1f", delay)
            if self._stop.wait(delay):
                break
            delay = min(max(delay, self.backoff.first) * 2, self.backoff.maximum)
            self.restarts += 1

    def _recheck(self) -> bool:
        try:
            return bool(self.recheck())
        except Exception:
            log.exception("exabgp.recheck_failed")
            return False

    def restart(self) -> None:
        """Stop the running ExaBGP (SIGTERM) and start it again at once, e.g. on a new config."""
        self._restart_now = True
        self.kill(signal.SIGTERM)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the running ExaBGP (tests use SIGKILL to check the restart)."""
        p = self.proc
        if p is not None and p.poll() is None:
            os.kill(p.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM: ExaBGP closes its sessions without a NOTIFICATION when graceful restart was
        negotiated, so routers keep our routes until the next agent's ExaBGP takes over."""
        with self._lock:
            self._stop.set()
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("exabgp.stop_timeout pid=%d: killing", p.pid)
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=5)
        if p is not None:
            # The bridge lives in the same group; make sure nothing of it outlives us.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
