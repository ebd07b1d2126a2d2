"""The `kpr` command line."""

from __future__ import annotations

import argparse
import errno
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from . import memory

# These imports (pydantic and the config's models, yaml, http) make objects that live as long
# as the process: the cyclic collector would walk them while they are made and after, and free
# nothing. Off meanwhile; `kpr run` freezes them with the agent's imports (cmd_run, and the
# plugins' in Agent.setup): before the files source starts, 73 collections and 14-17 ms of CPU
# otherwise, 16 and 2 ms. Not frozen here: every command and every process importing kpr.cli
# would freeze its whole heap (whatever it had made before, garbage cycles too).
with memory.paused():
    from . import __version__, api
    from .config import DEFAULT_CONFIG_PATH, ConfigError, KprConfig, load_config
    from .pluginmanager import PluginError, build_plugin_manager, discover


def _load(args: argparse.Namespace) -> KprConfig:
    return load_config(args.config)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    build_plugin_manager(config)
    print(f"{args.config}: ok (plugins enabled: {', '.join(config.enabled_plugins()) or 'none'})")
    return 0


def _log_stream() -> Any:
    """stderr for the agent's log, through a descriptor of its own: a BPF compile points fd 2
    at a capture file while it runs (kpr.bpf.loader), and the lines other threads log
    meanwhile (the source's first pass runs beside the compile) must not land there."""
    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no real descriptor (an embedding, a test)
        return sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8", errors="backslashreplace")


def _stacks_on_sigusr1(stream: Any) -> None:
    """`kill -USR1 <agent>` writes every thread's stack to the log: how an operator (or a
    test whose agent will not stop) sees where a stuck agent is. faulthandler writes from the
    signal handler itself, so it works while the main thread is blocked."""
    import faulthandler
    import signal

    try:
        stream.flush()
        faulthandler.register(signal.SIGUSR1, file=stream, all_threads=True, chain=False)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation) as e:  # no descriptor
        logging.getLogger(__name__).warning("agent.stack_dump_unavailable error=%s", e)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args)
    level = "debug" if args.debug else config.log.level
    stream = _log_stream()
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=stream,
    )
    _stacks_on_sigusr1(stream)
    # the agent's imports, and freezes what this module's imports left (see above)
    with memory.paused(freeze=True):
        from .daemon import Agent

    memory.one_heap()  # before the agent starts threads
    return Agent(config).run()


def _socket(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    try:
        return Path(_load(args).api.socket)
    except ConfigError:
        if Path(args.config) == DEFAULT_CONFIG_PATH and not DEFAULT_CONFIG_PATH.exists():
            return Path("/run/kpr/kpr.sock")
        raise


def cmd_status(args: argparse.Namespace) -> int:
    st = api.get(_socket(args), "/v1/status")
    for p in st.get("plugins", {}).values():
        p["counters"] = _integers(p.get("counters") or {})
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    src = st["source"]
    print(f"kpr {st['version']} on {st['node']['name']}  ready={'yes' if st['ready'] else 'no'}  uptime={st['uptimeSeconds']}s")
    zone = st["node"].get("zone")
    print(
        f"node:     addresses={','.join(st['node']['addresses']) or '-'} devices={','.join(st['node']['devices']) or '-'}"
        + (f" zone={zone}" if zone else "")
    )
    if src["kind"] == "kubernetes":
        print(f"source:   kubernetes {src.get('server', '')} ({src.get('connection', '')})  state={src.get('state', '?')}  synced={'yes' if src['synced'] else 'no'}")
        since = src.get("secondsSinceLastEvent")
        print(f"          last event {'-' if since is None else f'{since}s ago'}", end="")
        if src.get("lastError"):
            print(f"; last error {src.get('lastErrorAgeSeconds')}s ago: {src['lastError']}", end="")
        print()
    else:
        print(f"source:   {src['kind']} {src.get('path', '')}  synced={'yes' if src['synced'] else 'no'}")
    for origin, reason in sorted(src["errors"].items()):
        print(f"  error:  {origin}: {reason}")
    for origin, reason in sorted((src.get("warnings") or {}).items()):
        print(f"  warning: {origin}: {reason}")
    print(f"services: {st['services']}  frontends: {st['frontends']}  backends: {st['backends']}")
    maps = st.get("maps")
    if maps is not None:
        print(f"maps:     {_maps_line(maps)}")
        for line in maps.get("first") or ():
            print(f"  diff:   {line}")
    unhealthy = 0
    for name, p in st["plugins"].items():
        bus = p.get("bus", {})
        health = "ok" if p["healthy"] else "FAILING"
        unhealthy += 0 if p["healthy"] else 1
        counters = p["counters"]
        if args.verbose:
            shown = " ".join(f"{k}={v}" for k, v in sorted(counters.items()))
        else:
            shown = _key_counters(name, counters, bus)
        print(f"plugin {name}: {health}  {shown}".rstrip())
        if p["message"]:
            print(f"  {p['message']}")
        for key, err in sorted(bus.get("failing", {}).items()):
            print(f"  failing: {key}: {err}")
    if not args.verbose:
        print("(kpr status --verbose for every counter)")
    return 1 if unhealthy else 0


def _maps_line(maps: dict[str, Any]) -> str:
    if maps.get("error"):
        return f"not compared: {maps['error']}"
    age = maps.get("ageSeconds") or 0
    when = f" (compared {age:.0f}s ago)" if age >= 1 else ""
    if not maps.get("count"):
        return "in sync" + when
    per = ", ".join(f"{n} {c}" for n, c in sorted(maps.get("maps", {}).items()))
    n = maps["count"]
    return f"{n} difference{'' if n == 1 else 's'} from the desired state ({per}){when}"


def _integers(counters: dict[str, Any]) -> dict[str, Any]:
    """Counters with whole-number floats as integers (plugins report floats)."""
    return {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in counters.items()}


def _key_counters(plugin: str, counters: dict[str, Any], bus: dict[str, Any]) -> str:
    """The few counters that matter at a glance: errors, and drops by reason (non-zero)."""
    from .drops import drops

    errors = int(bus.get("errors", 0)) + sum(int(v) for k, v in counters.items() if k == "errors" or k.endswith("_errors"))
    parts = [f"errors={errors}"]
    if bus.get("pending"):
        parts.append(f"pending={bus['pending']}")
    by_reason = {r: n for r, n in sorted(drops(plugin, counters).items()) if n}
    if by_reason:
        parts.append("drops: " + " ".join(f"{r}={n}" for r, n in by_reason.items()))
    return "  ".join(parts)


def cmd_service_list(args: argparse.Namespace) -> int:
    if getattr(args, "datapath", False):
        return _service_list_datapath(args)
    rows = api.get(_socket(args), "/v1/services")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("SERVICE", "TYPE", "FRONTEND", "STATE", "BACKENDS")]
    reasons: dict[int, str] = {}
    for r in rows:
        addr = f"[{r['address']}]" if ":" in r["address"] else r["address"]
        fe = f"{addr}:{r['port']}/{r['protocol']}"
        bes = [
            (f"[{b['address']}]" if ":" in b["address"] else b["address"]) + f":{b['port']}" + (" (terminating)" if b["state"] != "active" else "")
            for b in r["backends"]
        ]
        state = r.get("state", "served")
        if state != "served" and r.get("reason"):
            # once per service, under its last frontend
            reasons = {i: why for i, why in reasons.items() if table[i][0] != r["service"]}
            reasons[len(table)] = r["reason"]
        table.append((r["service"], r["type"], fe, state, ", ".join(bes) or "(none)"))
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
        if i in reasons:
            print(f"  {row[0]} refused: {reasons[i]}")
    return 0


def _service_list_datapath(args: argparse.Namespace) -> int:
    rows = api.get(_socket(args), "/v1/datapath/services")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("SERVICE", "TYPE", "FRONTEND", "SCOPE", "ALGORITHM", "BACKENDS")]
    extra: dict[int, list[str]] = {}
    for r in rows:
        host = f"[{r['address']}]" if ":" in r["address"] else r["address"]
        fe = f"{host}:{r['port']}/{r['protocol']}"
        for scope, e in sorted(r["scopes"].items()):
            if "error" in e:
                table.append((r["service"], r["type"], fe, scope, "-", e["error"]))
                continue
            bes = [
                (f"[{b['address']}]" if ":" in b["address"] else b["address"]) + f":{b['port']}"
                + ("" if b["state"] == "active" else f" ({b['state']})") + (" local" if b.get("local") else "")
                for b in e["backends"]
            ]
            notes = []
            if e["local"]:
                notes.append("traffic policy Local")
            if e["affinityTimeout"]:
                notes.append(f"affinity {e['affinityTimeout']}s")
            if e["sourceRanges"]:
                notes.append(f"source ranges {', '.join(e['sourceRanges'])}")
            if e.get("straySlots"):
                notes.append(f"stray slots {e['straySlots']}")
            if notes:
                extra[len(table)] = notes
            table.append((r["service"], r["type"], fe, scope, e["algorithm"], ", ".join(bes) or "(none)"))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row[:5], widths)) + "  " + row[5])
        for note in extra.get(i, ()):
            print(f"    {note}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .explain import ExplainError, explain, parse_endpoint, parse_target, render

    try:
        via = list(args.via or [])
        text = args.target
        # `--via socket ADDR:PORT`: argparse hands the target to --via (nargs="+"); take it back.
        if text is None and via and via[-1] not in ("socket", "device") and (len(via) > 2 or via[0] == "socket"):
            text = via.pop()
        if text is None:
            raise ExplainError("the address to explain is missing: kpr explain ADDR:PORT[/PROTO]")
        target = parse_target(text)
        source = sport = None
        if args.source:
            source, sport = parse_endpoint(args.source, port_required=False)
        if via and via[0] == "device":
            if len(via) != 2:
                raise ExplainError("--via device needs the device name: --via device eth0")
            kind, device = "device", via[1]
        elif via in (["socket"], []):
            kind, device = ("socket" if via else "auto"), ""
        else:
            raise ExplainError(f"--via {' '.join(via)}: expected 'socket' or 'device NAME'")
        pin = Path(args.pin_path) if args.pin_path else Path(_load(args).bpf.pin_path)
        result = explain(pin, target, source=source, sport=sport, via=kind, device=device)
    except ExplainError as e:
        print(f"kpr explain: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as e:
        print(f"kpr explain: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(result))
    return 1 if result["service"] is None else 0  # no service (an announced address's unserved port: dropped)


def _split(values: list[str] | None) -> frozenset[str]:
    return frozenset(v.strip() for item in values or () for v in item.split(",") if v.strip())


def cmd_monitor(args: argparse.Namespace) -> int:
    from . import monitor as mon

    try:
        keep = mon.EventFilter(
            types=_split(args.type), services=_split(args.service), addresses=_split(args.address), reasons=_split(args.reason)
        )
        pin = Path(args.pin_path) if args.pin_path else Path(_load(args).bpf.pin_path)
        m = mon.Monitor(pin, types=keep.type_mask(), sample=args.sample)
        services = None
        if not args.no_names:
            sock = _socket(args)

            def services() -> dict:
                try:
                    return mon.service_names(api.get(sock, "/v1/services"))
                except api.ApiError as e:  # names are a nicety: events come from the maps
                    logging.getLogger(__name__).debug("monitor.no_names error=%s", e)
                    return {}

        if keep.services and services is None:
            raise mon.MonitorError("--service needs service names from the agent (drop --no-names)")
        with m:
            print_event = (lambda e: print(mon.as_json(e), flush=True)) if args.json else (lambda e: print(e.text(), flush=True))
            if not args.json:
                print(f"listening on {pin / mon.RING_MAP} (Ctrl-C to stop)", file=sys.stderr, flush=True)
            try:
                mon.run(m, keep, print_event, services=services, count=args.count, seconds=args.seconds)
            finally:
                lost = m.lost()
                if lost:
                    print(f"kpr monitor: {lost} events found the ring buffer full (all listeners)", file=sys.stderr)
    except mon.MonitorError as e:
        print(f"kpr monitor: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError) as e:
        print(f"kpr monitor: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    found = discover()
    enabled: set[str] = set()
    try:
        enabled = set(_load(args).enabled_plugins())
    except ConfigError as e:
        if Path(args.config).exists():
            raise
        print(f"(no config at {args.config}: showing every plugin as disabled)", file=sys.stderr)
        del e
    rows: list[dict[str, Any]] = [
        {"name": n, "enabled": n in enabled, "dist": d.dist, "version": d.version, "builtin": d.builtin, "entryPoint": d.value}
        for n, d in sorted(found.items())
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'PLUGIN':<16} {'ENABLED':<8} {'PACKAGE':<24} ENTRY POINT")
    for r in rows:
        print(f"{r['name']:<16} {'yes' if r['enabled'] else 'no':<8} {r['dist'] + ' ' + r['version']:<24} {r['entryPoint']}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    print(f"kpr {__version__}")
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    from .bpf import pinlock
    from .bpf.cleanup import CleanupError, cleanup

    config = _load(args)
    pin = Path(config.bpf.pin_path)
    # The agent's own hold on the pin path (kpr.bpf.pinlock) for the whole run: a live agent's
    # pin path is refused (its programs, maps and attachments would go from under it), and an
    # agent starting meanwhile is refused instead of pinning into a directory being removed.
    held = False
    try:
        held = pinlock.hold(pin)  # (False: no directory there, nothing to lock)
    except pinlock.PinPathBusy as e:
        if not args.force:
            print(
                f"kpr cleanup: bpf.pinPath {pin} is in use ({e.holder} holds it: a running kpr agent, or another "
                "kpr cleanup); cleaning up would remove a live agent's programs, maps and attachments from under "
                "it: stop the agent first (e.g. systemctl stop kpr), or run kpr cleanup --force",
                file=sys.stderr,
            )
            return 2
        logging.basicConfig(format="%(levelname)s %(name)s %(message)s", stream=sys.stderr)
        # (named: run as `python -m kpr.cli` this module is __main__)
        logging.getLogger("kpr.cli").warning(
            "event=cleanup_forced path=%s holder_pid=%s", pin, ",".join(map(str, e.pids)) or "unknown"
        )
    except OSError as e:
        # Not a directory (a file, under a file, a loop of links): no agent can hold it, and
        # cleanup says what it finds there; anything else is an error of its own.
        if e.errno not in (errno.ENOTDIR, errno.ELOOP):
            print(f"kpr cleanup: bpf.pinPath {pin}: {e.strerror or e}", file=sys.stderr)
            return 1
    try:
        done = cleanup(pin)
    except CleanupError as e:
        for item in e.removed:
            print(item)
        print(f"kpr: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # not kpr's to clean (a bpffs mount point, not in a bpffs)
        print(f"kpr cleanup: {e}", file=sys.stderr)
        return 2
    finally:
        if held:
            pinlock.release(pin)
    for item in done:
        print(item)
    if not done:
        print(f"nothing to remove under {config.bpf.pin_path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kpr", description="kpr: a kube-proxy replacement for Linux nodes")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=str(DEFAULT_CONFIG_PATH), help=f"config file (default {DEFAULT_CONFIG_PATH})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("run", parents=[common], help="run the agent in the foreground")
    s.add_argument("--debug", action="store_true", help="log at debug level")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("check-config", parents=[common], help="validate the config; exit 1 with the errors")
    s.set_defaults(fn=cmd_check_config)
    for name, fn, helptext in (("status", cmd_status, "the running agent's status"),):
        s = sub.add_parser(name, parents=[common], help=helptext)
        s.add_argument("--socket", help="API socket (default: api.socket from the config)")
        s.add_argument("--json", action="store_true")
        s.add_argument("--verbose", "-v", action="store_true", help="every counter of every plugin")
        s.set_defaults(fn=fn)
    s = sub.add_parser("explain", parents=[common], help="what the data path does with a connection, from the live maps")
    s.add_argument("target", nargs="?", metavar="ADDR:PORT[/PROTO]", help="the address dialled ([ADDR6]:PORT for IPv6; TCP by default)")
    s.add_argument("--from", dest="source", metavar="SRC[:PORT]", help="the client's address and source port")
    s.add_argument("--via", nargs="+", metavar="socket|device NAME", help="the hook: the socket hooks, or tc/XDP on a device (default: the socket hooks for a ClusterIP when socklb runs, else the first device with kpr's NodePort programs)")
    s.add_argument("--pin-path", help="bpffs directory of the maps (default: bpf.pinPath from the config)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_explain)
    s = sub.add_parser("monitor", parents=[common], help="live events from the data path (new flows, drops, refusals)")
    s.add_argument("--type", action="append", metavar="T[,T]", help="new, drop, refuse, ct_full, nat_full, pass (default: all)")
    s.add_argument("--service", action="append", metavar="NS/NAME[,...]", help="events of these services only")
    s.add_argument("--address", action="append", metavar="IP[,IP]", help="events whose client, frontend or backend is this address")
    s.add_argument("--reason", action="append", metavar="R[,R]", help="drop/refusal reasons (kpr_drops_total's) or new-flow kinds")
    s.add_argument("--sample", type=int, default=1, metavar="N", help="the programs emit 1 event in N (default 1: every event)")
    s.add_argument("--json", action="store_true", help="one JSON object per line")
    s.add_argument("--count", type=int, default=0, metavar="N", help="stop after N events")
    s.add_argument("--seconds", type=float, default=0.0, metavar="S", help="stop after S seconds")
    s.add_argument("--no-names", action="store_true", help="do not ask the agent for service names")
    s.add_argument("--socket", help="API socket for service names (default: api.socket from the config)")
    s.add_argument("--pin-path", help="bpffs directory of the maps (default: bpf.pinPath from the config)")
    s.set_defaults(fn=cmd_monitor)
    s = sub.add_parser("service", parents=[common], help="services the agent serves")
    ssub = s.add_subparsers(dest="service_command", required=True)
    sl = ssub.add_parser("list", parents=[common], help="one row per frontend")
    sl.add_argument("--socket", help="API socket (default: api.socket from the config)")
    sl.add_argument("--json", action="store_true", help="a JSON array, one object per frontend")
    sl.add_argument("--datapath", action="store_true", help="what the pinned maps hold (decoded), not the desired state")
    sl.set_defaults(fn=cmd_service_list)
    s = sub.add_parser("plugins", parents=[common], help="discovered plugins and whether each is enabled")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plugins)
    s = sub.add_parser("version", parents=[common], help="print the version")
    s.set_defaults(fn=cmd_version)
    s = sub.add_parser("cleanup", parents=[common], help="remove every program, filter, pin and attachment kpr made")
    s.add_argument("--force", action="store_true", help="clean up even while a kpr agent holds the pin path (takes its data path from under it)")
    s.set_defaults(fn=cmd_cleanup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return 1
    except (PluginError, api.ApiError) as e:
        print(f"kpr: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
