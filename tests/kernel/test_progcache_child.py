"""kpr.bpf.progcache's compile child (kpr.bpf.compile_child, load_programs(in_child=...)): the
entry comes back on its stdout and is loaded from memory, so a cache that cannot be written
costs no second compile; crashes are reported by the agent, true ones only; a child that
crashed, was killed or overran its time ends the load; the child imports nothing from the
agent's working directory and ends with the agent."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kpr.bpf import loader, pinlock, progcache
from kpr.bpf.progcache import CACHE_DIR, CachedModule, ChildCompileFailed, CompileChild, ProgramCache
from kpr.testing.progs import bcc_compiles
from kpr.testing.waiting import wait_for

from test_progcache import PINNED, Rig, rig  # noqa: F401 - rig: the fixture

KILLED_IN_COMPILE = """
import os, signal, sys
from kpr.bpf import loader
sys.stdin.buffer.read()
with loader._capture_fd2():  # as a compile that LLVM's fatal error ends
    os.write(2, b"LLVM ERROR: kprt fatal in the child\\n")
    os.kill(os.getpid(), signal.SIGKILL)
"""
HANGS_IN_COMPILE = """
import sys, time
from kpr.bpf import loader
with loader._capture_fd2():
    sys.stdin.buffer.read()
    time.sleep(600)
"""


@pytest.fixture
def crash_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A crash directory of this test's own (this process's and its children's)."""
    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(loader, "CRASH_DIR", d)
    monkeypatch.setenv("TMPDIR", str(d))
    return d


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if f"event={event} " in r.getMessage()]


def test_the_child_s_entry_is_stored_once_loaded(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The entry the child sent is written by this process after it loaded (a writer's
    leftover temporary file is no entry, and pruning counts none)."""
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    (rig.state / CACHE_DIR).mkdir(parents=True, mode=0o700)
    leftover = rig.state / CACHE_DIR / ".tmp-kprt.prog"
    leftover.write_bytes(b"")
    module = rig.load(in_child=True)
    assert module.compiled and len(events(caplog, "bpf_cache_stored")) == 1
    assert not events(caplog, "bpf_cache_not_stored"), caplog.text
    assert progcache.entries(rig.state / CACHE_DIR) == [p for p in rig.entries() if p != leftover]
    assert len(progcache.entries(rig.state / CACHE_DIR)) == 1


def test_a_cache_that_cannot_be_written_costs_no_second_compile(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The state directory on bpffs (the test harness's default): the child's entry is loaded
    from memory; the store fails once, logged, and nothing compiles here."""
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    rig.cache = ProgramCache(rig.pin / CACHE_DIR, rig.pin)
    with bcc_compiles() as compiles:
        module = rig.load(in_child=True)
    assert compiles == [0], "compiled once, in the child"
    assert isinstance(module, CachedModule) and module.compiled
    assert len(events(caplog, "bpf_cache_not_stored")) == 1 and not events(caplog, "bpf_cache_stored")
    assert not (rig.pin / CACHE_DIR).exists() and os.listdir(rig.pin) == [PINNED]
    rig.run(module)


def test_an_earlier_crash_is_reported_by_the_agent(rig: Rig, crash_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """What a compile that ended its process left is logged by this process (the child's
    stderr is not its log) and removed."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    crashed = crash_dir / f"kpr-bpf-compile-{gone.pid}.log"
    crashed.write_text("LLVM ERROR: kprt an earlier crash\n")
    module = rig.load(in_child=True)
    assert isinstance(module, CachedModule) and module.compiled
    assert [m for m in events(caplog, "bpf_compile_crashed") if "kprt an earlier crash" in m]
    assert not crashed.exists()


def test_a_child_that_crashes_ends_the_load(rig: Rig, crash_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A child ended by a signal in its compile: its output reported as a crash (once, here),
    and the load fails rather than compile here (which would crash the agent alike)."""
    with bcc_compiles() as compiles, pytest.raises(ChildCompileFailed, match="signal 9"):
        rig.load(in_child=CompileChild([sys.executable, "-c", KILLED_IN_COMPILE]))
    assert compiles == [0]
    crashes = events(caplog, "bpf_compile_crashed")
    assert len(crashes) == 1 and "kprt fatal in the child" in crashes[0]
    assert events(caplog, "bpf_child_compile_failed") and list(crash_dir.iterdir()) == []
    assert rig.entries() == []


def test_a_child_that_overruns_is_ended_and_no_crash(
    rig: Rig, crash_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past CHILD_TIMEOUT the child is ended by this process: reported as the child's failure,
    not as a compile's crash (its capture file is removed), and the load fails rather than
    compile here as long again."""
    child = CompileChild([sys.executable, "-c", HANGS_IN_COMPILE])
    proc = child.proc
    assert proc is not None
    capture = crash_dir / f"kpr-bpf-compile-{proc.pid}.log"
    wait_for(capture.exists, 60, "the child in its compile")
    monkeypatch.setattr(progcache, "CHILD_TIMEOUT", 0.5)
    with bcc_compiles() as compiles, pytest.raises(ChildCompileFailed, match="no answer"):
        rig.load(in_child=child)
    assert compiles == [0] and proc.poll() is not None
    assert events(caplog, "bpf_child_compile_failed") and not events(caplog, "bpf_compile_crashed")
    assert not capture.exists() and loader.report_crashed_compiles() == []


def test_the_child_runs_in_a_session_of_its_own() -> None:
    """A terminal's ^C goes to the agent's process group, not to the child's."""
    child = CompileChild()
    try:
        assert child.proc is not None and os.getsid(child.proc.pid) == child.proc.pid
    finally:
        child.close()


def test_the_child_does_not_import_from_the_agents_directory(
    rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bcc package in the agent's working directory is not what the child (root, trusted
    by the agent) imports: -P keeps the directory off its sys.path."""
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    fake = tmp_path / "cwd" / "bcc"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise SystemExit('the bcc in the working directory')\n")
    monkeypatch.chdir(tmp_path / "cwd")
    with bcc_compiles() as compiles:
        module = rig.load(in_child=True)
    assert compiles == [0] and module.compiled, caplog.text


def test_a_child_started_ahead_ends_with_the_agent(tmp_path: Path) -> None:
    """A child never used nor closed (its plugin configured, never started: the agent's
    setup failed and it exits) ends when the agent does: its stdin reaches end of file."""
    agent = subprocess.run(
        [sys.executable, "-c", "import os\nfrom kpr.bpf.progcache import CompileChild\n"
         "c = CompileChild()\nprint(c.proc.pid, flush=True)\nos._exit(0)"],
        capture_output=True, text=True, check=True,
    )
    pid = int(agent.stdout)

    def ended() -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(ended, 60, "the orphaned compile child to end")


def test_a_build_the_cache_cannot_record_compiles_once(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """An unpinned program array (a map kpr does not make from a record): the child's compile
    is what the agent loads (the child pins that map for it, under a name the agent removes
    once loaded), not a second compile here; nothing is stored, and the line says why."""
    from test_progcache import SOURCE

    source = SOURCE.replace("BPF_ARRAY(kprt_cache_local, __u64, 4);", "BPF_PROG_ARRAY(kprt_cache_local, 4);").replace(
        "__u64 *w = kprt_cache_local.lookup(&k);\n    if (w)\n        *w += 1;", "kprt_cache_local.call(ctx, 0);")
    caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
    with bcc_compiles() as here:
        module = rig.load(source=source, in_child=True)
    in_child = events(caplog, "bpf_compiled_in_child") + events(caplog, "bpf_child_compile_failed")
    assert here[0] + len(in_child) == 1, f"compiled {here[0]} time(s) here and {len(in_child)} in the child"
    assert isinstance(module, CachedModule) and module.compiled
    not_stored = events(caplog, "bpf_cache_not_stored")
    assert len(not_stored) == 1 and "kprt_cache_local" in not_stored[0], caplog.text
    assert rig.entries() == [] and os.listdir(rig.pin) == [PINNED], "no entry, no pin left for the agent"
    rig.run(module)  # the empty program array's tail call falls through


PINS_AND_DIES = """
import json, os, signal, sys
from kpr.bpf import maps as M
from kpr.bpf.progcache import HANDED_PREFIX
req = json.loads(sys.stdin.buffer.read())
m = M.BpfMap.create(M.MapSpec("kprt_handed", M.BPF_MAP_TYPE_ARRAY, 4, 8, 1))
m.pin(os.path.join(req["pin_path"], f"{HANDED_PREFIX}{os.getpid()}-kprt_handed"))
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_child_that_dies_after_handing_a_map_over_leaves_no_pin(rig: Rig, crash_dir: Path) -> None:
    """The pins a child handed over go however it ended (here killed after pinning one)."""
    from kpr.bpf.progcache import HANDED_PREFIX

    with pytest.raises(ChildCompileFailed, match="signal 9"):
        rig.load(in_child=CompileChild([sys.executable, "-c", PINS_AND_DIES]))
    assert [n for n in os.listdir(rig.pin) if n.startswith(HANDED_PREFIX)] == []


def test_an_earlier_agent_s_handed_pins_go_at_the_next_load(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """An agent killed while its child compiled never swept the pins the child handed over:
    the next agent's first cached load removes them (one agent per pin path, held:
    kpr.bpf.pinlock), not the pins of a child this process has running, nor other pins, nor
    anything when this process does not hold the pin path; `kpr cleanup` removes them too."""
    from kpr.bpf import maps as M
    from kpr.bpf.cleanup import cleanup
    from kpr.bpf.progcache import HANDED_PREFIX
    from kpr.testing.bpffs import pin_map

    spec = M.MapSpec("kprt_handed", M.BPF_MAP_TYPE_ARRAY, 4, 8, 1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    stale = f"{HANDED_PREFIX}{int(gone.stdout)}-kprt_handed"
    pin_map(rig.pin, stale, spec)
    running = CompileChild()
    try:
        mine = f"{HANDED_PREFIX}{running.pid}-kprt_handed"
        pin_map(rig.pin, mine, spec)
        caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
        # A process that does not hold the pin path (a tool, another agent's test) sweeps nothing.
        rig.load()
        assert stale in os.listdir(rig.pin) and "bpf_handed_pin_removed" not in caplog.text
        assert pinlock.hold(rig.pin)  # as the agent does at its start
        rig.load()
        left = os.listdir(rig.pin)
        assert stale not in left and f"event=bpf_handed_pin_removed pin={rig.pin / stale}" in caplog.text
        assert mine in left and PINNED in left, "a running child's pin and the build's own are kept"
    finally:
        running.close()
        pinlock.release(rig.pin)
    pin_map(rig.pin, stale, spec)
    cleanup(rig.pin)  # what `kpr cleanup` runs
    assert not rig.pin.exists(), "every pin removed, the handed ones too"
