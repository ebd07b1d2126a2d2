"""Where one case of a NodePort build spends its kernel time, by program, helper and instruction
(issue 14, item 1: measure first): the case of kpr.testing.nodeport_bench measured as the
benchmarks measure it (`measure`: flows flushed, the restoring wrapper's `--runs` a call) for `--seconds`
while `perf record -g` samples this benchmark's CPU; the samples under bpf_test_run counted by
the symbol they were taken in (kpr.testing.perfsamples), and for each of the build's programs its
hottest offsets in the JIT image, disassembled around them when objdump is there. The stop builds
(bench_xdp_nodeport.py, bench_nodeport_scale.py) say between which stages the time goes; this
says at which instruction: a cold line's first load stands out as one offset holding most of its
program's samples (perf's sample lands on the instruction after the stalled one, or on it).
It found the slot hash that crowded reply keys (README issue 14, eighteenth round): LRU map
helpers under a build that should have made no LRU insert.

    .venv/bin/python benchmarks/profile_nodeport.py [--hook xdp] [--case "new flow, remote backend"]
        [--cflags=-DKPR_NP_CT_SLOTS=1,...] [--seconds 20] [--runs 4000] [--top 12] [--offsets 3]
        [--services 50000 --stride 40009 --case "new flows over"]

--services and --stride make the lab of bench_nodeport_scale.py's many frontends: its spread
case ("new flows over N frontends") then shows which loads go cold at scale (item 6).

Needs perf (Debian: linux-perf) and root. Not a timing: shares of the samples, with the load.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kpr.bpf import maps as M
from kpr.testing.nodeport_bench import ProgLab, cases, exit_on_sigterm, measure
from kpr.testing.perfsamples import parse, program_name, program_tag

BUILD = "profiled"


def disassembly(code: bytes, at: int, before: int = 6, after: int = 2) -> list[str]:
    """objdump's lines of the JIT image around offset `at` (the sampled one marked), or []."""
    if not code or not shutil.which("objdump"):
        return []
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        f.write(code)
        f.flush()
        out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", "i386:x86-64", f.name],
                             capture_output=True, text=True).stdout
    lines = []
    for line in out.splitlines():
        head, sep, _rest = line.partition(":")
        try:
            off = int(head.strip(), 16) if sep and head.startswith(" ") else None
        except ValueError:
            off = None
        if off is not None:
            lines.append((off, line.strip()))
    i = next((n for n, (off, _) in enumerate(lines) if off >= at), len(lines))
    return [("=> " if off == at else "   ") + text for off, text in lines[max(0, i - before): i + after + 1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hook", default="xdp", choices=("xdp", "tc"))
    ap.add_argument("--case", default="new flow, remote backend (SNAT)", help="a case name of kpr.testing.nodeport_bench, or a part of one")
    ap.add_argument("--cflags", default="", help="the build's -D flags, comma separated")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--runs", type=int, default=4000, help="wrapper runs a call (new flows: flows a call)")
    ap.add_argument("--top", type=int, default=12, help="symbols listed")
    ap.add_argument("--offsets", type=int, default=3, help="hottest offsets listed per program")
    ap.add_argument("--services", type=int, default=10, help="the lab's services (the spread case's frontends: 50000 for item 6)")
    ap.add_argument("--stride", type=int, default=1, help="spread flows visit frontend n * stride %% fillers (40009: scattered)")
    a = ap.parse_args()
    if not shutil.which("perf"):
        print("profile_nodeport: perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        return 2
    if a.seconds <= 0 or a.runs <= 0 or a.services <= 0 or a.stride <= 0:
        ap.error("--seconds, --runs, --services and --stride: positive numbers")
    exit_on_sigterm()
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    flags = [f for f in a.cflags.split(",") if f]
    pr = lambda *x: print(*x, flush=True)  # noqa: E731
    with ProgLab(a.services, a.stride) as lab, tempfile.TemporaryDirectory(prefix="kpr-profile-") as tmp:
        dp = lab.load(a.hook, BUILD, flags)
        lab.load(a.hook, "default", [])
        matches = [c for c in cases(lab, a.hook) if a.case in c.name]
        if len(matches) != 1:
            names = "; ".join(c.name for c in cases(lab, a.hook))
            ap.error(f"--case {a.case!r} names {len(matches)} cases of: {names}")
        case = matches[0]
        data = Path(tmp) / "perf.data"
        pr(f"== {a.hook} {case.name}, build {flags or 'default'}; {time.strftime('%H:%M:%S')} UTC; "
           f"load {open('/proc/loadavg').read().split()[:3]}; CPU {cpu}; {a.seconds:g} s")
        moved: collections.Counter[str] = collections.Counter()
        calls = 0
        perf = subprocess.Popen(["perf", "record", "-q", "-g", "-C", str(cpu), "-o", str(data)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # (perf's own start, off the measured CPU's samples that count)
            if perf.poll() is not None:
                pr(f"profile_nodeport: perf record ended at once: {perf.stderr.read().strip() if perf.stderr else ''}")
                return 2
            end = time.monotonic() + a.seconds
            while time.monotonic() < end:
                # one round of the benchmarks' own: flows flushed, the case set up, the wrapper's runs
                moved.update(measure(lab, a.hook, BUILD, case, a.runs, 1, single=False).counted)
                calls += 1
        finally:
            perf.send_signal(signal.SIGINT)
            perf.wait(timeout=60)
        script = subprocess.run(["perf", "script", "-i", str(data)], capture_output=True, text=True)
        prof = parse(script.stdout.splitlines())
        pr(f"  {calls} calls of {a.runs} runs; counters: {dict(moved)}")
        pr(f"  {prof.in_run} of {prof.samples} samples under BPF_PROG_TEST_RUN; by the symbol they were taken in:")
        for sym, n in prof.leaves.most_common(a.top):
            pr(f"  {100 * n / prof.in_run:6.1f}%  {sym}")
        by_tag = {bytes(M.prog_info(dp.fd(p)).tag).hex(): p for p in dp.progs}
        for sym, _n in prof.leaves.most_common():
            tag = program_tag(sym)
            if tag not in by_tag or prof.share(sym) < 0.02:
                continue
            pr(f"  {program_name(sym)} ({100 * prof.share(sym):.1f}% of the samples): hottest offsets")
            code = M.prog_jited(dp.fd(by_tag[tag]))
            for off, share in prof.hottest(sym, a.offsets):
                pr(f"    +0x{off:x}  {100 * share:.1f}% of the program's samples")
                for line in disassembly(code, off):
                    pr(f"        {line}")
        pr(f"  load at the end {open('/proc/loadavg').read().split()[:3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
