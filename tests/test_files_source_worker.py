"""The files source's read-ahead in a worker process (kpr.sources.files_worker): each file's
result is what reading it in the agent gives (objects, errors, log lines, validation's
reading of each object), and a worker that fails in any way costs one warning line and
time, never a file; nothing is left running."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pickle
import re
import sys
from pathlib import Path

import pytest

from kpr import memory, model
from kpr import translate as tr
from kpr.sources import files as files_mod
from kpr.sources import files_worker
from kpr.testing.waiting import wait_for
from test_files_source import RecordingSink, make, service, slice_, write
from test_files_source_preload import _counting_loads


def _tree(tmp_path: Path, token: str = ""):
    """Every kind of file a directory holds: good YAML and JSON, lists, endpoints on nodes
    and zones, and files or objects that are refused, each for its own reason."""
    src = make(tmp_path)
    d = src.path
    zoned = slice_("web", "10.244.0.5", "10.244.1.5")
    for i, ep in enumerate(zoned["endpoints"]):
        ep["zone"] = f"zone-{token}-{i}"  # places new to this process (see _both_ways)
    write(d / "a.yaml", service("web"), zoned, {"kind": "Nope", "metadata": {"name": "x"}})
    write(d / "b.yaml", service("db", ns="data", clusterIP="10.96.0.1"), service("db", ns="data"))
    write(d / "c.yaml", service("bad", clusterIP="127.0.0.1"), service("lb", type="LoadBalancer"))
    (d / "d.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        service("api", ns="x"), slice_("api", "10.244.2.7", name="api-1") | {"metadata": {
            "name": "api-1", "namespace": "x", "labels": {"kubernetes.io/service-name": "api"}}},
    ]}))
    (d / "e.json").write_text("{not json")
    (d / "f.yaml").write_bytes(b"kind: Service\x00\x01")
    (d / "g.yaml").write_text("a: [unclosed")
    (d / "h.json").write_text(json.dumps(service("huge", ns="y", clusterIP="10.96.0.9") | {"x": "y" * 5000}))
    src.max_file_size = 4000  # h.json is too big
    return src


def _read_ahead(src) -> None:
    src.preload()
    src._preload_thread.join(60)
    assert not src._preload_thread.is_alive(), "the read-ahead did not end"


def _children() -> set[int]:
    """This process's children, alive or not yet reaped."""
    out: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            out |= {int(p) for p in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def _taken(src) -> dict[str, tuple]:
    """What the read-ahead holds for the first pass: per file its state, each object
    unpacked with validation's reading of it."""
    out = {}
    for name, st in src._preloaded.items():
        objects = [(ref, memory.unpack(p), tr.checked(p)) for ref, p in st.objects.items()]
        out[name] = (st.sig, st.errors, st.failed, sorted(st.service_keys), objects)
    return out


def _both_ways(tmp_path, monkeypatch, caplog, setup=None, read_ahead=True):
    """(in the agent, with the worker): what each read-ahead held, the first pass's sink,
    and the log lines from the first pass on."""
    out = []
    # The worker first: the places its slices name are then new to both processes.
    for mode in ("1", "0"):
        monkeypatch.setenv("KPR_FILES_WORKER", mode)
        src = _tree(tmp_path / mode, f"{os.getpid()}-{tmp_path.name}")
        src.worker_min_bytes = 0
        src.read_while_waiting = False
        if setup is not None and mode == "1":
            setup(src)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
            taken = {}
            if read_ahead:
                _read_ahead(src)
                taken = _taken(src)
            sink = RecordingSink()
            src.scan_once(sink)
        # Timings aside, which differ from run to run.
        lines = [(r.levelname, r.funcName, re.sub(r" ms=[0-9.]+", "", r.getMessage().replace(f"/{mode}/", "/")))
                 for r in caplog.records]
        errors = {k.replace(f"/{mode}/", "/"): v.replace(f"/{mode}/", "/") for k, v in sink.errors.items()}
        out.append((taken, sink, errors, lines))
        tr.forget_checked()
    return out[::-1]


def _same_but_paths(here, there) -> None:
    assert json.dumps(here, default=repr).replace("/0/", "/") == json.dumps(there, default=repr).replace("/1/", "/")


def test_the_worker_reads_what_the_agent_reads(tmp_path, monkeypatch, caplog):
    (here, sink_here, errors_here, lines_here), (there, sink, errors, lines) = _both_ways(tmp_path, monkeypatch, caplog)
    assert sorted(there) == sorted(here) == ["a.yaml", "b.yaml", "c.yaml", "d.json", "e.json", "f.yaml", "g.yaml", "h.json"]
    for name in here:
        sig, errs, failed, keys, objects = here[name]
        w_sig, w_errs, w_failed, w_keys, w_objects = there[name]
        assert (w_errs, w_failed, w_keys) == (errs, failed, keys), name
        assert [(ref, obj) for ref, obj, _ in w_objects] == [(ref, obj) for ref, obj, _ in objects], name
        # Validation's reading, field by field (the rules are this process's own instance).
        assert [read for _, _, read in w_objects] == [read for _, _, read in objects], name
        for (ref, _, read), (w_ref, _, w_read) in zip(objects, w_objects):
            assert all(s is sys.intern(s) for s in w_ref)
            if read is not None:
                assert w_read.ref is w_ref
                if hasattr(read, "rules"):
                    assert w_read.rules is read.rules
    assert any(read is not None and getattr(read, "codes", None) is not None
               for _, _, read in there["a.yaml"][4]), "no slice reading came across"
    assert sink.objects == sink_here.objects
    assert [e[0] for e in sink.events] == [e[0] for e in sink_here.events]
    assert errors == errors_here
    assert {"e.json", "f.yaml", "g.yaml", "h.json", "a.yaml", "c.yaml"} <= {Path(k).name for k in errors}
    # The same lines, from the same place in the code (the worker's summary and the line
    # choosing it aside).
    strip = [(lvl, fn, m) for lvl, fn, m in lines if "files.preloaded" not in m and "files.worker on=" not in m]
    assert strip == [(lvl, fn, m) for lvl, fn, m in lines_here if "files.preloaded" not in m and "files.worker on=" not in m]
    chosen = [m for _, _, m in lines if "files.worker on=" in m]
    assert len(chosen) == 1 and re.fullmatch(
        r"files.worker on=yes reason=forced setting=on bytes=\d+ load=[\d.]+ cpus=[1-9]\d* compile_beside=no", chosen[0]), chosen
    assert any("worker_files=8 " in m for _, _, m in lines)
    assert not any("worker_failed" in m for _, _, m in lines)
    assert _children() == set()


def test_a_first_pass_without_read_ahead_reads_with_the_worker(tmp_path, monkeypatch, caplog):
    """The agent runs the first pass while its plugins start (no read-ahead then): that
    pass reads with a worker, and sends and logs what reading in the agent does."""
    (_, sink_here, errors_here, lines_here), (_, sink, errors, lines) = _both_ways(
        tmp_path, monkeypatch, caplog, read_ahead=False)
    assert sink.objects == sink_here.objects and sink.objects
    assert [e[0] for e in sink.events] == [e[0] for e in sink_here.events]
    assert errors == errors_here
    strip = [(lvl, fn, m) for lvl, fn, m in lines if "files.read_with_worker" not in m and "files.worker on=" not in m]
    assert strip == [(lvl, fn, m) for lvl, fn, m in lines_here if "files.worker on=" not in m]
    assert any("files.read_with_worker files=8 " in m and "worker_files=8 " in m for _, _, m in lines)
    assert _children() == set()


def _script(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(text)
    return [sys.executable, str(path)]


# Each a real process that fails its own way: not there, dies at once, writes what is not
# a message, says nothing, dies after its first file.
FAILURES = {
    "not started": lambda tmp: ["/nonexistent/kpr-python"],
    "ended early (exit code 3": lambda tmp: _script(tmp, "import sys\nsys.exit(3)\n"),
    "bad output": lambda tmp: _script(tmp, "import os, sys\nos.write(int(sys.argv[1]), b'\\0\\0\\0\\4junk')\n"),
    "silent for": lambda tmp: _script(tmp, "import time\ntime.sleep(60)\n"),
    "ended early (exit code 7": lambda tmp: _script(tmp, (
        "import os, sys\n"
        "from kpr.sources import files, files_worker\n"
        "calls = []\n"
        "load = files.FilesSource._load_file\n"
        "def once(*a):\n"
        "    calls.append(1)\n"
        "    if len(calls) > 1:\n"
        "        os._exit(7)\n"
        "    return load(*a)\n"
        "files.FilesSource._load_file = once\n"
        "sys.exit(files_worker.main(sys.argv))\n"
    )),
}


@pytest.mark.parametrize("reason", list(FAILURES))
def test_a_failed_worker_costs_one_line_and_no_file(tmp_path, monkeypatch, caplog, reason):
    if reason == "silent for":
        monkeypatch.setattr(files_worker, "MESSAGE_TIMEOUT", 1.0)  # the others' starts may well take longer
    (here, sink_here, errors_here, lines_here), (there, sink, errors, lines) = _both_ways(
        tmp_path, monkeypatch, caplog, lambda src: setattr(src, "worker_command", FAILURES[reason](tmp_path)))
    warnings = [m for _, _, m in lines if "files.worker_failed" in m]
    assert len(warnings) == 1 and re.search(f"reason=[\"']{re.escape(reason)}", warnings[0]), warnings
    assert sorted(there) == sorted(here)
    assert [[(ref, obj, read) for ref, obj, read in there[n][4]] for n in sorted(there)] == [
        [(ref, obj, read) for ref, obj, read in here[n][4]] for n in sorted(here)]
    if reason.endswith("7"):
        assert "worker_files=1 " not in warnings[0] and "files=1;" in warnings[0]  # the first file came across
    assert sink.objects == sink_here.objects
    assert errors == errors_here
    assert _children() == set()


def test_stop_during_the_worker_leaves_nothing_running(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = _tree(tmp_path)
    src.worker_min_bytes = 0
    src.worker_command = _script(tmp_path, "import time\ntime.sleep(60)\n")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        src.preload()
        thread = src._preload_thread
        src.stop()
    assert not thread.is_alive()
    assert _children() == set()
    assert not [r for r in caplog.records if "worker_failed" in r.getMessage()]  # stopped, not failed


def test_reading_while_waiting_meets_the_worker(tmp_path, monkeypatch, caplog):
    """The read-ahead's thread reads from the last file down while the worker reads up:
    every file once, and the same as without the worker."""
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = make(tmp_path / "w")
    plain = make(tmp_path / "p")
    for s in (src, plain):
        for i in range(60):
            write(s.path / f"{i:03d}.yaml", service(f"s{i}"), slice_(f"s{i}", f"10.244.3.{i + 1}"))
    src.worker_min_bytes = 0
    loads = _counting_loads(monkeypatch)  # this process's reads (the worker's are its own)
    # This thread's first file waits for the worker's first message: on a quick machine the
    # thread reads all 60 before the worker starts, and the two never meet.
    workers, count = [], files_mod.FilesSource._load_file
    monkeypatch.setattr(files_worker.Worker, "__init__", lambda self, *a, _init=files_worker.Worker.__init__: (
        workers.append(self), _init(self, *a))[1])

    def first_after_the_worker(self, tr_, name, sig, old):
        if len(loads) == 0:
            wait_for(lambda: workers[0].ready(), 60, "the worker's first message")
        return count(self, tr_, name, sig, old)

    monkeypatch.setattr(files_mod.FilesSource, "_load_file", first_after_the_worker)
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
    assert sorted(src._preloaded) == [f"{i:03d}.yaml" for i in range(60)]
    summary = [r.getMessage() for r in src._held_log.records if "files.preloaded" in r.getMessage()]
    assert len(summary) == 1 and "worker_failed" not in " ".join(r.getMessage() for r in src._held_log.records)
    # Every file read once, by one of the two: the worker's files are not read here again.
    by_worker = int(re.search(r" worker_files=(\d+)", summary[0]).group(1))
    assert len(loads) == len(set(loads)) and len(loads) + by_worker == 60, (len(loads), by_worker)
    assert by_worker >= 1, summary  # (the worker came too late to meet: the meeting untested)
    sink, expected = RecordingSink(), RecordingSink()
    src.scan_once(sink)
    monkeypatch.setenv("KPR_FILES_WORKER", "0")
    plain.scan_once(expected)
    assert sink.objects == expected.objects
    assert _children() == set()


def test_a_slice_read_under_other_place_ids_is_moved_to_these(tmp_path):
    """A slice the worker read names places by the worker's ids; where this process gave a
    pair another id (its thread read that pair first), the reading is moved to this
    process's ids, or dropped (the store reads the slice again) when that is not exact."""
    obj = slice_("web", "10.244.9.1", "10.244.9.2")
    for i, ep in enumerate(obj["endpoints"]):
        ep["nodeName"], ep["zone"] = "node-moved", f"zone-moved-{os.getpid()}-{i}"
    obj["metadata"]["namespace"] = "default"
    read = pickle.loads(pickle.dumps(tr.validate_object(obj)))
    ids = [read.codes[i] >> 2 & 0xFFFF for i in range(2)]
    other = model.place_id("node-other", f"zone-other-{os.getpid()}")
    assert files_mod._move_places(tr, read, {ids[0]: other})
    assert read.place(0) == model.places[other] and read.place(1) == model.places[ids[1]]
    assert [read.address(i) for i in range(2)] == ["10.244.9.1", "10.244.9.2"]
    assert not files_mod._move_places(tr, read, {ids[1]: None})  # no id here for it
    obj["endpoints"][1]["addresses"] = ["10.244.9.1"]
    twice = tr.validate_object(obj)
    if twice is not None:  # an address twice: the ids may decide the order
        assert not files_mod._move_places(tr, twice, {ids[0]: other})


@pytest.mark.parametrize("setting, size, spare, expected", [
    ("off", 10**8, True, (False, "off")),
    ("on", 10**8, False, (True, "forced")),
    ("on", 10, True, (False, "small")),
    ("auto", 10, True, (False, "small")),
    ("auto", 10**8, True, (True, "idle_core")),
    ("auto", 10**8, False, (False, "no_idle_core")),
])
def test_the_worker_choice(setting, size, spare, expected):
    assert files_mod.worker_choice(setting, size, 2 * 1024 * 1024, spare) == expected


@pytest.mark.parametrize("value, setting", [
    (None, "auto"), ("", "auto"), ("auto", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), (" OFF ", "off")])
def test_the_worker_setting(monkeypatch, value, setting):
    if value is None:
        monkeypatch.delenv("KPR_FILES_WORKER", raising=False)
    else:
        monkeypatch.setenv("KPR_FILES_WORKER", value)
    assert files_mod.worker_setting() == setting


# (CPUs, 1-minute load, a BPF compile beside the reading) -> whether the worker starts: it
# needs a core of its own beside the reading thread and the compile (kpr.daemon.spare_core).
GATE = [
    (2, 0.3, False, True),   # a quiet 2-core node, no compile (a restart adopts its builds)
    (2, 0.3, True, False),   # a quiet 2-core node compiling: compile, reader and worker on 2
    (2, 1.2, False, False),  # a busy one
    (2, 2.5, False, False),
    (1, 0.0, False, False),  # one CPU: nothing to overlap with
    (4, 1.5, True, True),
    (4, 2.2, True, False),
    (4, 2.2, False, True),
]


@pytest.mark.parametrize("cpus, load, compiling, on", GATE)
def test_the_worker_starts_only_on_an_idle_core(tmp_path, monkeypatch, caplog, cpus, load, compiling, on):
    """In auto, the decision and its inputs are one line, and a worker runs only when the
    load average leaves a core idle for it (the in-agent read otherwise: no child process)."""
    monkeypatch.delenv("KPR_FILES_WORKER", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(os, "getloadavg", lambda: (load, 0.0, 0.0))
    src = _tree(tmp_path)
    src.worker_min_bytes = 0
    src.read_while_waiting = False  # what the worker read is then in the summary line
    src.compile_beside = lambda: compiling
    size = sum(p.stat().st_size for p in src.path.iterdir())
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
        src.scan_once(RecordingSink())
    lines = [r.getMessage() for r in caplog.records]
    chosen = [m for m in lines if m.startswith("files.worker on=")]
    reason = "idle_core" if on else "no_idle_core"
    assert chosen == [
        f"files.worker on={'yes' if on else 'no'} reason={reason} setting=auto bytes={size} "
        f"load={load:.2f} cpus={cpus} compile_beside={'yes' if compiling else 'no'}"], chosen
    summary = [m for m in lines if m.startswith("files.preloaded ")]
    assert len(summary) == 1 and ("worker_files=8 " in summary[0]) is on, summary
    assert sorted(src._files) == ["a.yaml", "b.yaml", "c.yaml", "d.json", "e.json", "f.yaml", "g.yaml", "h.json"]
    assert _children() == set()


def test_a_compile_is_expected_unless_builds_are_pinned_or_cached(tmp_path):
    """A restart adopts the programs the last agent left pinned (kpr.bpf.builds), a start
    after a reboot loads the program cache's (kpr.bpf.progcache): no compile beside the read
    then, and the worker may have the second core."""
    from kpr import daemon
    from kpr.bpf.builds import BUILDS_MAP
    from kpr.bpf.progcache import CACHE_DIR
    from kpr.config import KprConfig

    cfg = KprConfig.model_validate({"bpf": {"pinPath": str(tmp_path / "pins")}, "agent": {"stateDir": str(tmp_path / "state")}})
    assert daemon.compile_expected(cfg) is False  # no plugin enabled: nothing to compile
    cfg = KprConfig.model_validate({"bpf": {"pinPath": str(tmp_path / "pins")}, "agent": {"stateDir": str(tmp_path / "state")},
                                    "plugins": {"socklb": {"enabled": True}}})
    assert daemon.compile_expected(cfg) is True
    (tmp_path / "state" / CACHE_DIR).mkdir(parents=True)
    assert daemon.compile_expected(cfg) is True  # an empty cache
    (tmp_path / "state" / CACHE_DIR / "0123.prog").write_bytes(b"")
    assert daemon.compile_expected(cfg) is False
    assert daemon.compile_expected(cfg.model_copy(update={"bpf": cfg.bpf.model_copy(update={"program_cache": False})})) is True
    (tmp_path / "pins").mkdir()
    (tmp_path / "pins" / BUILDS_MAP).write_bytes(b"")
    assert daemon.compile_expected(cfg) is False


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def test_a_worker_that_cannot_be_set_up_costs_one_line_and_no_pass(tmp_path, monkeypatch, caplog):
    """No temp dir for the worker's stderr: the first pass reads in the agent and syncs, one
    warning line, no fd left open."""
    import tempfile

    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = _tree(tmp_path)
    src.worker_min_bytes = 0
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "nonexistent"))
    before = _open_fds()
    sink = RecordingSink()
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        src.scan_once(sink)
    assert sink.synced_calls == 1
    assert sorted(src._files) == ["a.yaml", "b.yaml", "c.yaml", "d.json", "e.json", "f.yaml", "g.yaml", "h.json"]
    warnings = [r.getMessage() for r in caplog.records if "files.worker_failed" in r.getMessage()]
    assert len(warnings) == 1 and re.search("reason=[\"']not started: ", warnings[0]), warnings
    assert _open_fds() <= before
    assert _children() == set()


def test_the_worker_delivers_past_fd_1024(tmp_path, monkeypatch, caplog):
    """The agent's pipe from the worker numbered past select's limit (the plugins' BPF fds
    while the first pass runs): its files still come across."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = _tree(tmp_path)
    src.worker_min_bytes = 0
    src.read_while_waiting = False
    held = []
    try:
        while len(held) < 1100 and (not held or held[-1] < 1030):
            held.append(os.dup(0))
        with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
            _read_ahead(src)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    lines = [r.getMessage() for r in src._held_log.records]
    assert not [m for m in lines if "worker_failed" in m], lines
    assert [m for m in lines if "files.preloaded" in m and " worker_files=8 " in m], lines
    assert _children() == set()


def test_the_worker_does_not_import_from_the_agents_directory(tmp_path, monkeypatch, caplog):
    """A module in the agent's working directory is not what the worker (root, trusted
    pickles) imports: -P keeps the directory off its sys.path."""
    assert "-P" in files_worker.command()
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "yaml.py").write_text("raise SystemExit('the yaml in the working directory')\n")
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = _tree(tmp_path / "tree")
    src.worker_min_bytes = 0
    src.read_while_waiting = False
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
    lines = [r.getMessage() for r in src._held_log.records]
    assert not [m for m in lines if "worker_failed" in m], lines
    assert [m for m in lines if "files.preloaded" in m and " worker_files=8 " in m], lines


def test_a_forced_worker_does_not_guess_the_compile(tmp_path, monkeypatch, caplog):
    """KPR_FILES_WORKER=1 starts the worker whatever the cores do: the compile's guess (it
    imports kpr.bpf.progcache) is not asked."""
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    src = _tree(tmp_path)
    src.worker_min_bytes = 0
    asked = []
    src.compile_beside = lambda: asked.append(1) or True
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
    assert asked == []
    assert [r for r in src._held_log.records if "files.worker on=yes reason=forced" in r.getMessage()]


def _pipe_takes_pipe_size() -> bool:
    """Whether this process may make a pipe files_worker.PIPE_SIZE large (past
    /proc/sys/fs/pipe-max-size only with CAP_SYS_RESOURCE)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, files_worker.PIPE_SIZE)
        return True
    except OSError:
        return False
    finally:
        os.close(r)
        os.close(w)


def test_a_pipe_refused_pipe_size_is_made_as_large_as_allowed(monkeypatch):
    """Past /proc/sys/fs/pipe-max-size (without CAP_SYS_RESOURCE, as in most containers) the
    kernel refuses the size: the pipe is then made pipe-max-size large, not left at 64 KB."""
    with open("/proc/sys/fs/pipe-max-size") as f:
        most = int(f.read())
    monkeypatch.setattr(files_worker, "PIPE_SIZE", most * 2)
    if _pipe_takes_pipe_size():
        pytest.skip("this process may make pipes past pipe-max-size (CAP_SYS_RESOURCE)")
    r, w = os.pipe()
    try:
        files_worker._large_pipe(w)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == most
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.skipif(not _pipe_takes_pipe_size(), reason="a pipe of PIPE_SIZE is refused here (pipe-max-size, no CAP_SYS_RESOURCE)")
def test_a_job_past_64_kb_is_one_write(tmp_path, monkeypatch):
    """The job's pipe is files_worker.PIPE_SIZE large, as the messages' is: a job of a few
    thousand files goes in at once, the worker still importing (here: never reading)."""
    monkeypatch.setattr(files_worker, "JOB_TIMEOUT", 1.0)
    job = {"files": [(f"{'n' * 200}-{i:04d}.yaml", (0, 0, 0)) for i in range(2000)]}
    assert len(pickle.dumps(job)) > 256 * 1024
    worker = files_worker.Worker(job, _script(tmp_path, "import time\ntime.sleep(20)\n"))
    worker.close()
    assert _children() == set()


def test_a_worker_that_does_not_take_its_job_costs_one_line_not_the_start(tmp_path, monkeypatch, caplog):
    """A job past the pipe's PIPE_SIZE (a name and signature per file) to a worker that never
    reads it: the write gives up after JOB_TIMEOUT, the worker is ended, and every file is
    read in the agent (the write used to block for as long as the worker lived: the worker's
    marker, made after its sleep, would be there when the agent moved on)."""
    monkeypatch.setenv("KPR_FILES_WORKER", "1")
    monkeypatch.setattr(files_worker, "JOB_TIMEOUT", 1.0)
    src = _tree(tmp_path)
    many = files_worker.PIPE_SIZE // 200 + 400
    for i in range(many):
        (src.path / f"{'n' * 200}-{i:05d}.yaml").write_text("")
    src.worker_min_bytes = 0
    src.read_while_waiting = False
    marker = tmp_path / "worker-slept"
    src.worker_command = _script(tmp_path, f"import time\ntime.sleep(20)\nopen({str(marker)!r}, 'w').close()\n")
    with caplog.at_level(logging.INFO, logger="kpr.sources.files"):
        _read_ahead(src)
    assert not marker.exists(), "the agent waited for the worker to end its sleep"
    lines = [r.getMessage() for r in src._held_log.records]
    warnings = [m for m in lines if "files.worker_failed" in m]
    assert len(warnings) == 1 and "did not take its job in 1s" in warnings[0], lines
    assert len(src._preloaded) == many + 8 and [m for m in lines if "files.preloaded" in m], lines
    assert _children() == set()
