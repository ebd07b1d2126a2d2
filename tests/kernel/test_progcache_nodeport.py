"""The NodePort builds (tc and XDP) from the program cache (kpr.bpf.progcache): after a compile
and the removal of every pin the datapath made (what a reboot leaves of them: the writer's
maps are made again by the writer, the state directory is kept), a new Datapath loads its
programs without bcc's compile, the kernel holds the same instructions, and packets
(BPF_PROG_TEST_RUN in a lab namespace) take the same path: a NodePort flow's first packet
and an established one give the same verdict, output and counters, through the stage array
the cached load made anew under its own name and filled. A spoilt entry compiles, with the
miss line; the kernctx fallback's build is cached too."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kpr.bpf import kernctx
from kpr.bpf import maps as M
from kpr.bpf.progcache import CACHE_DIR, CachedModule, ProgramCache
from kpr.testing.nodeport_bench import NODE4, NODEPORT, ProgLab
from kpr.testing.nodeport_runs import run_counted
from kpr.testing.progs import bcc_compiles, xlated_by_map_name

from test_kernctx import refuse_the_kfunc_call

pytestmark = pytest.mark.kernel

HOOKS = ("tc", "xdp")
# what a datapath pins itself (the writer's maps stay: the writer makes them at any start)
WRITER_MAPS = {"kpr_affinity", "kpr_backend", "kpr_ct", "kpr_fe", "kpr_maglev", "kpr_revnat", "kpr_slots",
               "kpr_snat", "kpr_srcrange", "kpr_svc"}


@pytest.fixture(scope="module")
def lab(require_kernel: None) -> Iterator[ProgLab]:
    with ProgLab(services=4) as lab:
        for hook in HOOKS:
            lab.wrapper(hook)  # (bcc compiles the lab's own wrapper once, outside the counted loads)
        yield lab


@pytest.fixture
def cache(lab: ProgLab, tmp_path: Path) -> ProgramCache:
    return ProgramCache(tmp_path / CACHE_DIR, lab.pin)


def drop(lab: ProgLab, name: str) -> None:
    """Close a build and unpin everything but the writer's maps: no stage array, counters,
    NodePort maps or build records left to reuse."""
    lab.builds.pop(name).close()
    for p in lab.pin.iterdir():
        if p.is_file() and p.name not in WRITER_MAPS:
            p.unlink()


def flow(lab: ProgLab, hook: str, build: str) -> list[tuple[int, bytes, dict[str, int]]]:
    """A NodePort flow's SYN (new: the service lookup's stages) and its next packet
    (established: conntrack), each with its verdict, output and moved counters."""
    lab.flush_flows()
    return [run_counted(lab, hook, build, lab.packet(NODE4, NODEPORT, sport=41000, flags=f)) for f in ("S", "A")]


def programs(dp: Any) -> dict[str, tuple[bytes, list[str]]]:
    return {name: xlated_by_map_name(dp.fd(name)) for name in dp.progs}


@pytest.mark.parametrize("hook", HOOKS)
def test_a_start_without_pins_loads_the_build_from_the_cache(
    lab: ProgLab, cache: ProgramCache, hook: str, caplog: pytest.LogCaptureFixture
) -> None:
    with bcc_compiles() as compiles:
        first = lab.load(hook, "first", program_cache=cache)
    assert compiles == [1] and first.build == "compiled"
    assert len(list(cache.directory.glob("*.prog"))) == 1
    compiled, path, calls_pin = programs(first), flow(lab, hook, "first"), first.calls_pin
    drop(lab, "first")

    caplog.set_level(logging.INFO, logger="kpr")
    with bcc_compiles() as compiles:
        second = lab.load(hook, "second", program_cache=cache)
    try:
        assert compiles == [0], "loaded without bcc's compile"
        assert isinstance(second.bpf, CachedModule) and second.build == "cached"
        assert "build=cached" in caplog.text and "event=bpf_cache_hit" in caplog.text
        # its own stage array, pinned under the name this start chose, holding every stage
        assert second.calls_pin != calls_pin and (lab.pin / second.calls_pin).exists()
        with M.BpfMap.open_pinned(lab.pin / second.calls_pin) as calls:
            slots = {i: calls.lookup(M.U32.pack(i)) for i in range(len(second.CALLS))}
        assert {i: M.U32.unpack(v)[0] for i, v in slots.items() if v is not None} == {
            i: second.prog_id(c) for i, c in enumerate(second.CALLS) if c}
        assert programs(second) == compiled, "the same instructions, against maps of the same names"
        again = flow(lab, hook, "second")
        assert again == path, "the same verdicts, packets and counters"
        # counted in this build's pinned counters (the XDP build's are pinned under other names
        # than their maps'), and through the stages: no tail call missed
        assert all(moved for _v, _p, moved in path) and not any("tail_call_missing" in m for _v, _p, m in path)
    finally:
        drop(lab, "second")


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-30] ^= 1
    path.write_bytes(bytes(data))


def _other_build(path: Path) -> None:
    # a valid entry (signed) that is another build's: its recorded key is not this one's
    body = json.loads(path.read_bytes().partition(b"\n")[2])
    body["key"] = "0" * 40
    data = json.dumps(body).encode()
    path.write_bytes(hashlib.sha256(data).hexdigest().encode() + b"\n" + data)


@pytest.mark.parametrize("spoil, reason", [(_corrupt, "checksum"), (_other_build, "another build's")],
                         ids=["corrupt", "other-build"])
def test_a_spoilt_entry_compiles_with_the_miss_line(
    lab: ProgLab, cache: ProgramCache, spoil: Any, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    lab.load("tc", "first", program_cache=cache)
    path = flow(lab, "tc", "first")
    drop(lab, "first")
    spoil(next(cache.directory.glob("*.prog")))
    caplog.set_level(logging.INFO, logger="kpr")
    with bcc_compiles() as compiles:
        second = lab.load("tc", "second", program_cache=cache)
    try:
        misses = [r.getMessage() for r in caplog.records if "event=bpf_cache_miss" in r.getMessage()]
        assert len(misses) == 1 and reason in misses[0], caplog.text
        # one compile, of the same build (with the checksum-state read where the kernel has it)
        assert compiles == [1] and second.build == "compiled" and second.reads_csum_state == bool(kernctx.cflags())
        assert flow(lab, "tc", "second") == path
        assert "event=bpf_cache_stored" in caplog.text
    finally:
        drop(lab, "second")


def test_the_kernctx_fallback_build_is_cached_and_preferred(
    lab: ProgLab, cache: ProgramCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A kernel that refuses the checksum-state read: the first start compiles twice (the
    refused build, then the fallback) and caches the fallback; the next start loads the
    fallback from the cache, without compiling the refused build again."""
    refuse_the_kfunc_call(monkeypatch)
    with bcc_compiles() as compiles:
        first = lab.load("tc", "first", program_cache=cache)
    assert compiles == [2] and first.build == "compiled" and first.reads_csum_state is False
    path = flow(lab, "tc", "first")
    drop(lab, "first")
    caplog.set_level(logging.INFO, logger="kpr")
    with bcc_compiles() as compiles:
        second = lab.load("tc", "second", program_cache=cache)
    try:
        assert compiles == [0] and second.build == "cached" and second.reads_csum_state is False
        assert "event=kernctx_fallback_cached" in caplog.text
        assert flow(lab, "tc", "second") == path
    finally:
        drop(lab, "second")


def test_kpr_run_after_kpr_cleanup_starts_tc_nodeport_from_the_cache(kernel_headers: Path) -> None:
    """The real agent with tc_nodeport in node1's namespace: started, stopped, its data path
    removed with `kpr cleanup` (a reboot's leftovers: nothing pinned, agent.stateDir kept); the
    next `kpr run` loads the build from the cache and an external client reaches the NodePort;
    the one after adopts what that one attached."""
    import os
    import signal

    from kpr.testing.agent import kpr_cleanup
    from kpr.testing.echo import name_and_peer

    from tc_nodeport_env import NODES, NP_RESTART_PORT, client, nodeport_restart_rig

    node1 = NODES["node1"]["addr"]
    with nodeport_restart_rig(f"kpr-h5-npc{os.getpid()}") as rig:
        def build() -> str:
            return rig.status()["plugins"]["tc_nodeport"]["details"]["build"]

        def served() -> set[str]:
            return {name for name, _seen in name_and_peer(client(rig.topo, "tcp", node1, NP_RESTART_PORT, 4))}

        rig.start()
        first = served()
        assert build() == "compiled" and first and first <= {"p1a", "p2a"}
        rig.stop(signal.SIGTERM)
        res = kpr_cleanup(rig.pin, rig.work)
        assert res.returncode == 0, res.stderr
        assert not list(rig.pin.glob("kpr_np_*")), "nothing of the NodePort build left pinned"
        assert list((rig.agent.state / CACHE_DIR).glob("*.prog")), "kpr cleanup leaves the cache"
        rig.start()
        log_text = (rig.work / f"agent-{rig.starts}.log").read_text()
        assert build() == "cached", log_text[-3000:]
        assert "event=bpf_cache_hit file=" in log_text and "tc_nodeport.c" in log_text
        again = served()
        assert again and again <= {"p1a", "p2a"}
        rig.stop(signal.SIGTERM)
        rig.start()
        assert build() == "adopted"
        rig.stop(signal.SIGTERM)
