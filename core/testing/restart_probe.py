"""A real-time probe of a service's availability, for restart benchmarks: it measures gaps in
SERVICE, not gaps in the measuring client's own scheduling.

Why: a client that starts a connection every 10 ms from threads at normal priority on a busy
two-CPU machine starts some of them 15-25 ms late with nothing wrong in the data path (a
compile, another process, its own GIL); "the longest time without a connect starting" then
measures the client. The probe (PROBE, started by `start_probe`) is instead:

- one dedicated process at real-time priority (SCHED_FIFO, `prio`, set by the process itself
  with os.sched_setscheduler): it runs whenever it is runnable, ahead of every normal process,
  compiles included (the kernel's RT throttling still leaves others 5% of each second);
- one thread, non-blocking sockets and a selector: no thread start per attempt, no GIL
  hand-over, garbage collection off;
- on a fixed schedule: attempt k is due at t0 + k * gap; how late the probe started it is
  recorded too (`late`), so the probe's own jitter is a figure, not an assumption.

Each attempt records CLOCK_MONOTONIC (time.monotonic, the caller's clock too) at its start,
when the TCP handshake completed (connect reported writable: SYN, the data path's
translation, SYN-ACK, all in the kernel, no backend process involved) and when the backend's
greeting line arrived (the backend's own scheduling included), or the error (`timeout` after
`timeout` s, like a client giving up). One long-lived connection sends a byte every tick and
records each echo's round trip, or how it broke (an echo still unanswered when the probe
stops: `held` says the connection stalled).

`window()` turns the records into a restart's figures:
- failed: attempts started in the window that failed;
- connect_ms: the longest handshake of an attempt started in the window (a stall of the data
  path shows here whole: a dropped SYN costs a 1 s retransmit, i.e. a failure);
- interval_ms: the longest interval between successive completed handshakes, from the last
  one before the window to the first one after it (or to the window's end when none came
  after it): `gap` apart when nothing is wrong (so its floor is the spacing itself, 10 ms),
  spacing + d when service stalls for d;
- answer_ms: the longest handshake-plus-greeting; echo_ms: the longest echo on the held
  connection; late_ms: the probe's own longest lateness in starting an attempt.
"""

from __future__ import annotations

import json
import select
import subprocess
from pathlib import Path
from typing import Any

from kpr.testing.echo import CLIENT_PRELUDE, PY, Running, await_started, start_running

# argv: host port gap timeout prio. stdout: "started"; for each line on stdin one JSON line of
# counts so far (`progress`); on stdin EOF one JSON line:
# {"attempts": [[due, start, connected|null, answered|null, error], ...],
#  "echoes": [[sent, back|null (unanswered at the end)], ...], "held": error or "", "prio": the policy it got}
PROBE = CLIENT_PRELUDE + r"""
import errno, gc, json, os, selectors, socket, sys, threading, time
host, port, gap, timeout, prio = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
got = "SCHED_OTHER"
if prio > 0:
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
        got = f"SCHED_FIFO {prio}"
    except OSError as e:
        got = f"SCHED_OTHER ({e})"
gc.disable()
now = time.monotonic
sel = selectors.DefaultSelector()
attempts, echoes = [], []
held = {"error": "", "sock": None, "sent": None}
stop = threading.Event()
def finish(rec, s, error=""):
    rec[4] = error
    sel.unregister(s)
    s.close()
def start(due):
    rec = [due, now(), None, None, ""]
    attempts.append(rec)
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setblocking(False)
    rc = s.connect_ex((host, port))
    if rc not in (0, errno.EINPROGRESS):
        rec[4] = errno.errorcode.get(rc, str(rc))
        s.close()
        return
    sel.register(s, selectors.EVENT_WRITE, (rec, b""))
def hold():
    s = socket.create_connection((host, port), timeout=2)
    greeting(s)
    s.setblocking(False)
    held["sock"] = s
    sel.register(s, selectors.EVENT_READ, None)
def on_held():
    s = held["sock"]
    try:
        c = s.recv(64)
        if not c:
            raise ConnectionResetError(errno.ECONNRESET, "eof")
    except BlockingIOError:
        return
    except OSError as e:
        held["error"] = err(e)
        sel.unregister(s)
        held["sock"] = None
        return
    for _ in c:
        echoes.append([held["sent"], now()])
    held["sent"] = None
def on_attempt(s, mask, data):
    rec, buf = data
    t = now()
    if rec[2] is None:
        e = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if e:
            finish(rec, s, errno.errorcode.get(e, str(e)))
            return
        rec[2] = t
        sel.modify(s, selectors.EVENT_READ, (rec, buf))
        return
    try:
        c = s.recv(512)
    except BlockingIOError:
        return
    except OSError as e:
        finish(rec, s, err(e))
        return
    if not c:
        finish(rec, s, "ECONNRESET")
        return
    buf += c
    if buf.endswith(b"\n"):
        rec[3] = now()
        finish(rec, s)
    else:
        sel.modify(s, selectors.EVENT_READ, (rec, buf))
def expire(t):
    for key in list(sel.get_map().values()):
        if key.data is not None and t - key.data[0][1] > timeout:
            finish(key.data[0], key.fileobj, "timeout")
def run():
    due = now()
    while not stop.is_set() or len(sel.get_map()) > (1 if held["sock"] else 0):
        t = now()
        if t >= due and not stop.is_set():
            start(due)
            if held["sock"] is not None and held["sent"] is None:
                try:
                    held["sock"].send(b"x")
                    held["sent"] = now()
                except OSError as e:
                    held["error"] = err(e)
            due += gap
            while due < t:  # ticks missed altogether: skipped, the lateness shows them
                due += gap
            continue
        wait = max(0.0, due - t) if not stop.is_set() else 0.05
        for key, mask in sel.select(wait):
            if key.data is None:
                on_held()
            else:
                on_attempt(key.fileobj, mask, key.data)
        expire(now())
try:
    hold()
except OSError as e:
    held["error"] = "at start: " + err(e)
print("started", flush=True)
def control():
    # a line on stdin asks for the counts so far (a test waits for them); EOF stops the probe
    for _ in sys.stdin:
        sent = held["sent"]
        print(json.dumps({"attempts": len(attempts), "echoes": len(echoes),
                          "unanswered_s": 0.0 if sent is None else now() - sent}), flush=True)
    stop.set()
threading.Thread(target=control, daemon=True).start()
run()
if held["sock"] is not None and held["sent"] is not None:
    # an echo still unanswered at the end: the held connection stalled without an error (its
    # packets dropped). Kept as an echo without its return (window() counts it to the window's
    # end), and the held connection's error once it waited longer than an attempt may
    late = now() - held["sent"]
    echoes.append([held["sent"], None])
    if late > timeout:
        held["error"] = f"stalled: no echo for {late:.1f} s"
print(json.dumps({"attempts": attempts, "echoes": echoes, "held": held["error"], "prio": got}), flush=True)
"""


def start_probe(topo: Any, ns: str, host: str, port: int, *, cgroup: Path | None = None, gap: float = 0.01,
                timeout: float = 1.0, prio: int = 10) -> Running:
    """PROBE in namespace `ns` of `topo` (and in `cgroup`, where socket hooks must see it),
    dialling host:port every `gap` s at SCHED_FIFO priority `prio` (0: normal priority);
    `finish()` stops it and returns its records."""
    return start_running(topo, ns, probe_argv(host, port, gap=gap, timeout=timeout, prio=prio), cgroup=cgroup,
                         what="probe", timeout=60)


def probe_argv(host: str, port: int, *, gap: float = 0.01, timeout: float = 1.0, prio: int = 10) -> list[str]:
    return [PY, "-c", PROBE, host, str(port), str(gap), str(timeout), str(prio)]


def started(proc: subprocess.Popen) -> Running:
    """A PROBE process started by hand, once it has its held connection (or failed to get one)."""
    return await_started(proc, what="probe", timeout=60)


def progress(run: Running) -> dict[str, float]:
    """A running PROBE's counts so far: attempts started, echoes answered, and how long the
    held connection's echo on its way has been unanswered (s; 0 when none is)."""
    if run.proc.poll() is not None:
        raise RuntimeError(f"the probe exited ({run.proc.returncode}) before its counts were asked")
    run.proc.stdin.write("\n")
    run.proc.stdin.flush()
    # (a probe that hangs must not hold the caller's wait past its own deadline)
    if not select.select([run.proc.stdout], [], [], 10)[0]:
        raise TimeoutError("the probe did not answer with its counts within 10 s")
    line = run.proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the probe exited ({run.proc.wait()}) without its counts")
    return json.loads(line)


def window(rec: dict, start: float, end: float, gap: float) -> dict[str, Any]:
    """One window's figures (module docstring) from a finished probe's records."""
    inside = [a for a in rec["attempts"] if start <= a[1] <= end]
    done = sorted(a[2] for a in rec["attempts"] if a[2] is not None)
    before = [t for t in done if t < start]
    after = [t for t in done if t > end]
    # a stall still going at the window's end (no handshake after it: the service never came
    # back while the probe ran) lasts at least until the end, as the old client's longest_gap counts
    points = before[-1:] + [t for t in done if start <= t <= end] + (after[:1] or [end])
    intervals = [b - a for a, b in zip(points, points[1:])]
    # every echo on its way during the window, also one sent just before it (a stall that began
    # as the window opened is the window's); one never answered (the held connection stalled
    # until the probe stopped) lasted at least until the window's end
    echoes = [(end if b is None else b) - a for a, b in rec["echoes"]
              if a is not None and a <= end and (b is None or b >= start)]
    ms = 1e3
    return {
        "attempts": len(inside),
        "failed": sum(1 for a in inside if a[4]),
        "errors": sorted({a[4] for a in inside if a[4]}),
        "connect_ms": max((a[2] - a[1] for a in inside if a[2] is not None), default=0.0) * ms,
        "answer_ms": max((a[3] - a[1] for a in inside if a[3] is not None), default=0.0) * ms,
        "interval_ms": max(intervals, default=end - start) * ms,
        "echo_ms": max(echoes, default=0.0) * ms,
        "late_ms": max((a[1] - a[0] for a in inside), default=0.0) * ms,
        # attempts started against one per gap: below 100 only when the probe skipped ticks
        "load_pct": 100.0 * len(inside) / max(1.0, (end - start) / gap),
    }
