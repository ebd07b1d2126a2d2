"""The agent's start order: the source's first pass runs while the plugins start when every
plugin says its start needs nothing of the source (kpr.daemon.STARTS_WITHOUT_SOURCE), and
follows their start otherwise; what the pass sends reaches no plugin before every plugin has
started. And the agent's log keeps reaching stderr while a BPF compile captures fd 2."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from kpr import daemon, hookimpl
from kpr.daemon import STARTS_WITHOUT_SOURCE, Agent
from kpr.model import PluginStatus
from kpr.testing.agent import AgentConfig
from kpr.testing.bus import HookCalls
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import wait_for


class SlowStart(HookCalls):
    """Its kpr_start waits (as a BPF compile takes its time) until the agent's store holds the
    source's whole first pass or `released` is set; it records what it saw, and every hook."""

    def __init__(self, agent_box: list, released: threading.Event):
        self.agent_box = agent_box
        self.released = released
        self.calls: list[str] = []
        self.store_synced_in_start: bool | None = None
        self.store_in_start = "unset"

    @hookimpl
    def kpr_start(self, context):
        agent = self.agent_box[0]
        self.store_in_start = agent.store
        # No store yet: the source starts after the plugins (nothing to wait for).
        wait_for(lambda: agent.store is None or agent.store.is_synced or self.released.is_set(), timeout=120, what="the first pass or the release")
        self.store_synced_in_start = agent.store is not None and agent.store.is_synced
        self.calls.append("kpr_start")


class WithoutSource(SlowStart):
    starts_without_source = True


class PlainStart:
    """A plugin that says nothing about its start (as lb_ipam, which watches the source)."""

    @hookimpl
    def kpr_start(self, context):
        pass


def make_agent(tmp_path, plugins: dict, source_first: bool | None = True) -> Agent:
    cfg = AgentConfig(tmp_path, None)
    cfg.manifest("web", yaml_docs(service("web", cluster_ip="10.96.0.10"), endpoint_slice("web", ["10.244.1.5"])))
    # True: as on an idle node (the agent's own choice looks at the load average)
    return Agent(cfg.parse(), internal_plugins=plugins, source_first=source_first)


def test_first_pass_runs_while_plugins_start_and_reaches_them_after(tmp_path, monkeypatch):
    box: list = []
    released = threading.Event()
    slow = WithoutSource(box, released)
    assert getattr(slow, STARTS_WITHOUT_SOURCE) is True
    monkeypatch.setattr(daemon, "spare_core", lambda: (True, 0.1, 2))
    agent = make_agent(tmp_path, {"slow": slow}, source_first=None)  # the agent's own choice, on an idle node
    box.append(agent)
    try:
        agent.setup()
        assert slow.store_synced_in_start is True, "the store had the whole first pass while the plugin started"
        wait_for(lambda: "kpr_sync_complete" in slow.calls, what="the initial state delivered")
        # Nothing reached the plugin before its start had returned; then the initial state.
        assert slow.calls[0] == "kpr_start"
        assert slow.calls.index("kpr_service_upsert") < slow.calls.index("kpr_sync_complete")
        wait_for(lambda: (agent._tick(), agent._ready_sent)[1], what="ready")
    finally:
        released.set()
        agent.shutdown()


class SeesSwitches(WithoutSource):
    """Records the GIL's switch interval while its start runs beside the first pass."""

    switch_in_start: float | None = None
    fails = False
    never_in_place = False

    @hookimpl
    def kpr_start(self, context):
        self.switch_in_start = sys.getswitchinterval()
        super().kpr_start(context)
        if self.fails:
            raise RuntimeError("cannot attach")

    @hookimpl
    def kpr_status(self):
        # (never in place: the agent never gets ready)
        return PluginStatus(details={"synced": False}) if self.never_in_place else None


@pytest.mark.parametrize("ends", ["ready", "a start that fails", "never ready", "never ready, the pass last"])
def test_short_gil_switches_while_the_first_pass_runs_beside_the_start(tmp_path, monkeypatch, ends):
    """A plugin's start beside the pass (socklb attaching after its compile child) takes the
    GIL back within daemon.START_SWITCH_INTERVAL, not Python's 5 ms a syscall; the interval is
    the one from before once the agent is ready, or once it stops without being ready, or,
    when it does not get ready (a plugin never in place), once the start and the pass are done,
    whichever ends last (the pass, when the plugins' start returns at once: _on_synced)."""
    before = sys.getswitchinterval()
    assert before > daemon.START_SWITCH_INTERVAL
    box: list = []
    released = threading.Event()
    plugin = SeesSwitches(box, released)
    plugin.fails = ends == "a start that fails"
    plugin.never_in_place = ends.startswith("never ready")
    pass_held = threading.Event()
    if ends == "never ready, the pass last":
        released.set()  # (the plugin's start returns at once)
        from kpr.sources.files import FilesSource

        first_pass = FilesSource._pass

        def held_pass(self, sink):
            pass_held.wait(30)  # (until setup() has returned: the pass ends after the start loop)
            return first_pass(self, sink)

        monkeypatch.setattr(FilesSource, "_pass", held_pass)
    else:
        pass_held.set()
    monkeypatch.setattr(daemon, "spare_core", lambda: (True, 0.1, 2))
    agent = make_agent(tmp_path, {"sees": plugin}, source_first=None)
    box.append(agent)
    try:
        if plugin.fails:
            with pytest.raises(daemon.PluginError, match="cannot attach"):
                agent.setup()
            assert not agent._ready_sent
        else:
            agent.setup()
        assert plugin.switch_in_start == daemon.START_SWITCH_INTERVAL
        if ends == "ready":
            wait_for(lambda: (agent._tick(), agent._ready_sent)[1], what="ready")
            assert sys.getswitchinterval() == before
        if ends == "never ready, the pass last":
            assert not agent._pass_done and sys.getswitchinterval() == daemon.START_SWITCH_INTERVAL
            pass_held.set()
        if ends.startswith("never ready"):
            wait_for(lambda: sys.getswitchinterval() == before, what="the interval back, the start and the pass done")
            agent._tick()
            assert agent.store.is_synced and not agent._ready_sent
    finally:
        released.set()
        pass_held.set()
        agent.shutdown()
        assert sys.getswitchinterval() == before
        sys.setswitchinterval(before)  # (for the next test, had this one failed)


@pytest.mark.parametrize("case", ["a plugin that does not say so", "no idle core"])
def test_the_source_follows_the_start(tmp_path, monkeypatch, case):
    box: list = []
    released = threading.Event()
    released.set()  # its start must not wait for a pass that cannot come yet
    slow = WithoutSource(box, released)
    if case == "no idle core":
        monkeypatch.setattr(daemon, "spare_core", lambda: (False, 9.0, 2))
        agent = make_agent(tmp_path, {"slow": slow}, source_first=None)
    else:
        agent = make_agent(tmp_path, {"plain": PlainStart(), "slow": slow})
    box.append(agent)
    try:
        agent.setup()
        assert slow.store_in_start is None, "the source started before every plugin had started"
        assert slow.store_synced_in_start is False
        wait_for(lambda: "kpr_sync_complete" in slow.calls, what="the initial state delivered")
        assert slow.calls[0] == "kpr_start"
    finally:
        agent.shutdown()


class OffTheGil(WithoutSource):
    starts_off_the_gil = True


def test_a_start_off_the_gil_takes_the_first_pass_beside_it_on_a_busy_node(tmp_path, monkeypatch, caplog):
    """No idle core, but every start leaves the GIL free (socklb compiling in a child): the
    pass runs beside the start; the same busy node with one start that does not say so (a
    compile in the agent) keeps the pass after the start (test_the_source_follows_the_start)."""
    box: list = []
    released = threading.Event()
    slow = OffTheGil(box, released)
    monkeypatch.setattr(daemon, "spare_core", lambda: (False, 9.0, 2))
    agent = make_agent(tmp_path, {"slow": slow}, source_first=None)
    box.append(agent)
    try:
        with caplog.at_level("INFO", logger="kpr.daemon"):
            agent.setup()
        assert slow.store_synced_in_start is True, "the store had the whole first pass while the plugin started"
        assert any("first_pass_early on=yes" in r.getMessage() and "why=starts_off_the_gil" in r.getMessage() for r in caplog.records)
        wait_for(lambda: "kpr_sync_complete" in slow.calls, what="the initial state delivered")
        assert slow.calls[0] == "kpr_start"
    finally:
        released.set()
        agent.shutdown()


def test_a_start_off_the_gil_beside_one_that_is_not_follows(tmp_path, monkeypatch):
    box: list = []
    released = threading.Event()
    released.set()
    slow = WithoutSource(box, released)
    monkeypatch.setattr(daemon, "spare_core", lambda: (False, 9.0, 2))
    agent = make_agent(tmp_path, {"off": OffTheGil(box, released), "slow": slow}, source_first=None)
    box.append(agent)
    try:
        agent.setup()
        assert slow.store_in_start is None, "the source started before every plugin had started"
    finally:
        agent.shutdown()


class FailsToStart:
    """Its kpr_start fails once the first pass is under way (as a compile error would), after
    another plugin started."""

    starts_without_source = True

    def __init__(self, agent_box: list):
        self.agent_box = agent_box

    @hookimpl
    def kpr_start(self, context):
        agent = self.agent_box[0]
        wait_for(lambda: agent.store is not None, what="the first pass under way")
        raise RuntimeError("cannot compile")


class Stops(WithoutSource):
    stopped = 0

    @hookimpl
    def kpr_stop(self, context):
        self.stopped += 1


def test_a_start_that_fails_while_the_first_pass_runs(tmp_path):
    """A plugin's start fails while the early first pass runs: setup names it, the plugin that
    had started is stopped, nothing the pass sent reached a plugin (the bus never started), and
    the shutdown that follows (kpr run's) stops the source."""
    box: list = []
    released = threading.Event()
    released.set()
    started = Stops(box, released)
    agent = make_agent(tmp_path, {"started": started, "fails": FailsToStart(box)})
    box.append(agent)
    try:
        with pytest.raises(daemon.PluginError, match="plugin fails: start failed: RuntimeError: cannot compile"):
            agent.setup()
        assert [h.name for h in agent.handles] == ["started", "fails"]
        assert started.stopped == 1 and started.calls == ["kpr_start"]
        assert all(w._thread.ident is None for w in agent.bus.workers.values()), "a bus worker started"
        files = agent.source._thread
        assert files is not None and files.is_alive(), "the source was running"
    finally:
        agent.shutdown()
    # this agent's source thread (not any other test's): stop() joins it briefly, a slow one ends after
    wait_for(lambda: not files.is_alive(), what="the files source's thread ended")


# A process whose sys.stderr is fd 2, as `kpr run`'s: `own` logs through _log_stream(), `plain`
# through sys.stderr itself. It prints what the capture collected; stderr is what reached fd 2.
# (In-process, pytest's capture points sys.stderr at its own file, not fd 2, so a stream without
# a descriptor of its own would pass too.)
_LOG_DURING_CAPTURE = """
import sys
from kpr.bpf.loader import _capture_fd2
from kpr.cli import _log_stream
stream = _log_stream() if sys.argv[1] == "own" else sys.stderr
with _capture_fd2() as captured:
    stream.write("event=logged_meanwhile\\n")
    stream.flush()
print(captured[0])
"""


def _log_during_capture(how: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LOG_DURING_CAPTURE, how], capture_output=True, text=True, timeout=120, check=True)


def test_the_log_reaches_stderr_while_a_compile_captures_fd2():
    own = _log_during_capture("own")
    assert "event=logged_meanwhile" not in own.stdout, "the line went into the compile's capture"
    assert "event=logged_meanwhile" in own.stderr
    # The check itself: a stream on fd 2 lands in the capture.
    plain = _log_during_capture("plain")
    assert "event=logged_meanwhile" in plain.stdout and "event=logged_meanwhile" not in plain.stderr
