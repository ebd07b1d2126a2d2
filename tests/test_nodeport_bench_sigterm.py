"""The NodePort benchmarks' SIGTERM handler (kpr.testing.nodeport_bench.exit_on_sigterm) unwinds
the benchmark itself, never a forked child of it.

pyroute2 does namespace work (IPRoute(netns=...)) in forked children and stops each with
SIGTERM. With a handler that raised SystemExit in every process, such a child unwound the
copy of the benchmark's stack it was forked with: the lab's teardown ran in the child and
deleted the live lab's namespaces (their veths with them) mid-run. Here pyroute2's own
ChildProcess is stopped while inside its target, so the signal always lands in the child
(in a benchmark it raced the child's exit). Root-free: nothing but a fork and a signal."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from pyroute2.process import ChildProcess
    from kpr.testing.nodeport_bench import exit_on_sigterm

    exit_on_sigterm()
    owner = os.getpid()
    ready_r, ready_w = os.pipe()

    def target():
        os.write(ready_w, b"x")  # in the child, inside its work
        time.sleep(30)

    try:
        if sys.argv[1] == "child":
            proc = ChildProcess(target=target, args=[])
            proc.run()
            os.read(ready_r, 1)
            proc.stop()  # SIGTERM, as pyroute2 stops its children
            print("child exit", proc.exitcode, flush=True)
        else:
            os.kill(owner, signal.SIGTERM)
            time.sleep(30)
    finally:
        # stands for the lab's teardown (its namespaces, veths and pins)
        print("teardown in", "the benchmark" if os.getpid() == owner else "a forked child", flush=True)
    """
)


def _run(mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=60)


def test_a_forked_child_stopped_by_sigterm_never_runs_the_benchmarks_teardown() -> None:
    res = _run("child")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert "teardown in a forked child" not in lines, "the child unwound the benchmark's stack"
    assert lines == ["child exit 143", "teardown in the benchmark"], res.stdout + res.stderr


def test_sigterm_to_the_benchmark_unwinds_it() -> None:
    res = _run("owner")
    assert res.returncode == 143, res.stdout + res.stderr
    assert res.stdout.splitlines() == ["teardown in the benchmark"]
