"""socklb's cold start from the program cache (kpr.bpf.progcache): after its links and own
pinned maps are gone (what a reboot leaves, the state directory kept), a new plugin loads
the programs the first one compiled, without bcc's compile, and a pod's ClusterIP connect is
translated as before."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf.cleanup import cleanup
from kpr.bpf.progcache import CACHE_DIR, entries
from kpr.model import FrontendType, NodeInfo, Protocol
from kpr.plugins.socklb.plugin import HOOKS, HOSTADDR_MAP, REVNAT_MAP, STATS_MAP, SockLB
from kpr.testing.agent import lab_scratch
from kpr.testing.harness import plugin_context
from kpr.testing.progs import bcc_compiles, xlated_by_map_name

from socklb_env import Env, answers, be, build_topology, service

CIP = "10.96.0.60"


@pytest.fixture
def children(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every kpr.bpf.progcache.CompileChild made (socklb's configure and load_programs look it up there)."""
    from kpr.bpf import progcache

    made: list[object] = []

    class Counted(progcache.CompileChild):
        def __init__(self, *args: object, **kwargs: object) -> None:
            made.append(self)
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(progcache, "CompileChild", Counted)
    return made


def programs(plugin: SockLB) -> dict[str, tuple[bytes, list[str]]]:
    return {a.prog: xlated_by_map_name(a.fn.fd) for a in plugin._attached}


@contextlib.contextmanager
def lab(tag: str, backend: str) -> Iterator[tuple[Env, Path, Path, Path]]:
    """(env, pin path, cgroup, agent.stateDir off bpffs) with a TCP ClusterIP CIP:80 served by `backend`."""
    from kpr.bpf.probes import cgroup2_mount

    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    with contextlib.ExitStack() as stack:
        mnt, topo, cg, work = lab_scratch(stack, f"{tag}{os.getpid()}")
        build_topology(topo)
        pin = mnt / "kpr"
        stack.callback(cleanup, pin)
        env = Env(topo, pin, None, cg)
        stack.callback(env.close)
        env.open_writer()
        env.apply(service("cached", [(FrontendType.CLUSTER_IP, CIP, 80)], [be(backend)], protocols=(Protocol.TCP,)))
        yield env, pin, cg, work / "state"


def test_a_cold_start_loads_socklb_from_the_cache(
    kernel_headers: Path, caplog: pytest.LogCaptureFixture, children: list[object]
) -> None:
    with lab("kpr-h1-pc", "be1") as (env, pin, cg, state):
        section = {"cgroupPath": str(cg), "keepAttachedOnStop": False}

        def start() -> SockLB:
            return env.start(SockLB(), section, name="socklb", state_dir=state)

        def served() -> bool:
            return answers(env.client("tcp", CIP, 80, 2)) == ["be1"] * 2

        caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
        with bcc_compiles() as compiles:
            first = start()
        # compiled in a process of its own (kpr.bpf.compile_child), started at configure: no
        # bcc.BPF in this one
        assert compiles == [0] and first.kpr_status().details["build"] == "compiled"
        assert "started_ahead=yes" in caplog.text and len(children) == 1
        assert first._compiler is None and children[0].proc is None  # type: ignore[attr-defined]
        assert len(entries(state / CACHE_DIR)) == 1
        assert served()
        compiled = programs(first)
        env.stop(first)  # links released (keepAttachedOnStop off): nothing to adopt
        for name in (REVNAT_MAP, HOSTADDR_MAP, STATS_MAP):  # as after a reboot: made anew
            (pin / name).unlink()
        assert not answers_ok(env, CIP), "no hooks: the ClusterIP is not translated"

        with bcc_compiles() as compiles:
            second = start()
        assert compiles == [0], "loaded without bcc's compile"
        assert len(children) == 1, "an entry on disk: no compile child started"
        st = second.kpr_status()
        assert st.details["build"] == "cached" and st.counters["hooks_attached"] == len(HOOKS) + 2
        assert {v["action"] for v in st.details["links"].values()} == {"created"}
        assert all((pin / name).exists() for name in (REVNAT_MAP, HOSTADDR_MAP, STATS_MAP))
        assert programs(second) == compiled, "the kernel holds the same instructions, against maps of the same names"
        assert served()
        assert second.stats()["connect"] >= 2, "counted in the stats map made anew"


def test_without_links_a_cold_start_attaches_the_cached_programs(
    kernel_headers: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, children: list[object]
) -> None:
    """KPR_BPF_LINKS=cgroup (a kernel without cgroup links): no link to adopt, so every start
    loads; with agent.stateDir off bpffs the second one loads from the cache, attaches those
    programs the old way and detaches the first start's copies."""
    from kpr.bpf import links
    from kpr.bpf.loader import attach_type_value

    monkeypatch.setenv("KPR_BPF_LINKS", "cgroup")
    with lab("kpr-m2-pcfb", "be2") as (env, _pin, cg, state), contextlib.ExitStack() as stack:
        section = {"cgroupPath": str(cg)}
        cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        stack.callback(os.close, cg_fd)

        def hooks() -> dict[str, list[int]]:
            return {a: ids for _p, _t, a in HOOKS if (ids := links.query(cg_fd, attach_type_value(a)))}

        def start() -> SockLB:
            return env.start(SockLB(), section, name="socklb", state_dir=state)

        caplog.set_level(logging.INFO, logger="kpr.bpf.progcache")
        with bcc_compiles() as compiles:
            first = start()
        # compiled in a process of its own (kpr.bpf.compile_child), started at configure: no
        # bcc.BPF in this one
        assert compiles == [0] and first.kpr_status().details["build"] == "compiled"
        assert "started_ahead=yes" in caplog.text and len(children) == 1
        assert first._compiler is None and children[0].proc is None  # type: ignore[attr-defined]
        assert first.kpr_status().details["linksFallback"]
        compiled = programs(first)
        before = hooks()
        assert {a: len(ids) for a, ids in before.items()} == {a: 1 for _p, _t, a in HOOKS}
        env.stop(first)  # keepAttachedOnStop: the hooks stay, attached without links

        with bcc_compiles() as compiles:
            second = start()
        assert compiles == [0], "loaded without bcc's compile"
        assert len(children) == 1, "an entry on disk: no compile child started"
        st = second.kpr_status()
        assert st.details["build"] == "cached" and st.details["linksFallback"]
        assert {v["action"] for v in st.details["links"].values()} == {"attached"}
        now = hooks()
        assert {a: len(ids) for a, ids in now.items()} == {a: 1 for _p, _t, a in HOOKS}, "one copy per hook"
        assert all(now[a] != before[a] for a in now), "the cached programs replaced the compiled ones"
        assert programs(second) == compiled
        assert answers(env.client("tcp", CIP, 80, 2)) == ["be2"] * 2
        second.cfg = second.cfg.model_copy(update={"keep_attached_on_stop": False})
        env.stop(second)
        assert hooks() == {}


def answers_ok(env: Env, ip: str) -> bool:
    rows = env.client("tcp", ip, 80, 1)
    return all("error" not in r for r in rows)


def test_the_cache_can_be_turned_off(tmp_path: Path) -> None:
    plugin = SockLB()
    on = plugin_context("socklb", NodeInfo("n", addresses=("10.0.0.1",)), tmp_path / "pin", state_dir=tmp_path)
    off = plugin_context("socklb", NodeInfo("n", addresses=("10.0.0.1",)), tmp_path / "pin", state_dir=tmp_path,
                         config={"bpf": {"pinPath": str(tmp_path / "pin"), "programCache": False}})
    plugin.pin_path = tmp_path / "pin"
    assert plugin._program_cache(on).directory == tmp_path / CACHE_DIR
    assert plugin._program_cache(off) is None


def test_a_start_that_fails_early_ends_the_compile_child(tmp_path: Path, children: list[object]) -> None:
    """The child started at configure ends with a start that fails before any compile (here:
    bpf.pinPath on no bpffs), not later."""
    plugin = SockLB()
    ctx = plugin_context("socklb", NodeInfo("n", addresses=("10.0.0.1",)), tmp_path / "pin", state_dir=tmp_path)
    plugin.kpr_configure(plugin.kpr_config_schema().model_validate({}), ctx)
    assert len(children) == 1
    proc = children[0].proc  # type: ignore[attr-defined]
    assert proc is not None and proc.poll() is None
    with pytest.raises(OSError, match="not on a bpffs"):
        plugin.kpr_start(ctx)
    assert proc.poll() is not None and plugin._compiler is None


def test_the_compile_guess_is_the_agents(tmp_path: Path) -> None:
    """socklb starts a child when kpr.bpf.progcache.compile_likely (the agent's guess too)
    says so and the cache is on; a writer's leftover temporary file is no entry, nor is an
    entry of a cache that would not be read (untrusted)."""
    from kpr.bpf.builds import BUILDS_MAP
    from kpr.daemon import compile_expected

    pin = tmp_path / "pin"
    pin.mkdir()
    ctx = plugin_context("socklb", NodeInfo("n", addresses=("10.0.0.1",)), pin, state_dir=tmp_path,
                         config={"plugins": {"socklb": {"enabled": True}}})
    cache = tmp_path / CACHE_DIR
    cache.mkdir()
    (cache / ".tmp-abc.prog").write_bytes(b"")
    assert SockLB._compile_likely(ctx) and compile_expected(ctx.config)
    (cache / "0123.prog").write_bytes(b"")
    assert not SockLB._compile_likely(ctx) and not compile_expected(ctx.config)
    mode = tmp_path.stat().st_mode
    tmp_path.chmod(0o777)  # a cache under a directory others may change is not read: a compile
    assert SockLB._compile_likely(ctx) and compile_expected(ctx.config)
    tmp_path.chmod(mode)
    (cache / "0123.prog").unlink()
    (pin / BUILDS_MAP).write_bytes(b"")
    assert not SockLB._compile_likely(ctx) and not compile_expected(ctx.config)
    (pin / BUILDS_MAP).unlink()
    off = plugin_context("socklb", NodeInfo("n", addresses=("10.0.0.1",)), pin, state_dir=tmp_path,
                         config={"bpf": {"pinPath": str(pin), "programCache": False}})
    assert not SockLB._compile_likely(off)


def test_kpr_run_after_kpr_cleanup_starts_from_the_cache(kernel_headers: Path) -> None:
    """The real agent: started, stopped, its data path removed with `kpr cleanup` (what a
    reboot leaves: nothing pinned, agent.stateDir kept); the next `kpr run` loads socklb from
    the cache and serves the ClusterIP, and the one after adopts what that one attached."""
    import signal

    from kpr.testing import echo
    from kpr.testing.agent import kpr_cleanup

    from socklb_env import RESTART_IP, restart_rig

    with restart_rig(f"kpr-h1-pcrun{os.getpid()}") as rig:
        def build() -> str:
            return rig.status()["plugins"]["socklb"]["details"]["build"]

        def served() -> bool:
            got = set(answers(echo.client(rig.topo["cli"], "tcp", RESTART_IP, 80, 4, cgroup=rig.load_cgroup)))
            return bool(got) and got <= {"be1", "be2"}  # (an empty set is no answer)

        rig.start()
        assert build() == "compiled" and served()
        rig.stop(signal.SIGTERM)
        res = kpr_cleanup(rig.pin, rig.work)
        assert res.returncode == 0, res.stderr
        assert entries(rig.agent.state / CACHE_DIR), "kpr cleanup leaves the cache"
        rig.start()
        log_text = (rig.work / f"agent-{rig.starts}.log").read_text()
        assert build() == "cached" and "event=bpf_cache_hit" in log_text, log_text[-3000:]
        assert served()
        rig.stop(signal.SIGTERM)
        rig.start()
        assert build() == "adopted"
        rig.stop(signal.SIGTERM)
