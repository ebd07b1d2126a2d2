"""Upgrades across two real `kpr run` processes under traffic: the first agent runs, is
stopped (SIGTERM), and a second one starts with other BPF code (a config key that changes a
compile flag), while a client opens a connection every 10 ms and holds one more. No failed
connection, the held one unbroken; afterwards exactly one program per hook, the same link ids
and map ids, and the links hold the second agent's new programs. A plain restart after that
adopts the new build as it is (kpr.bpf.builds: no compile, the same program ids).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any, Callable

from kpr.bpf import links
from kpr.bpf import maps as M


def pinned_links(pin: Path) -> dict[str, links.LinkInfo]:
    return {str(p.relative_to(pin)): li for p, li in links.pinned(pin / links.LINKS_DIR).items()}


def map_ids(pin: Path, names: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for name in names:
        with M.BpfMap.open_pinned(pin / name) as m:
            out[name] = m.id
    return out


def plugin_status(rig: Any, plugin: str) -> dict:
    return rig.status()["plugins"][plugin]


def upgrade_under_load(rig: Any, host: str, port: int, plugin: str, maps: tuple[str, ...],
                       at_hook: Callable[[links.LinkInfo], list[int]], *, adopts: bool) -> dict:
    """Start, upgrade under load, then restart plainly; `at_hook(link_info)` lists the program
    ids the kernel runs at that link's hook (BPF_PROG_QUERY). `adopts`: the plugin keeps the
    links' programs when its build did not change (kpr.bpf.builds), otherwise it loads new ones
    into the same links. Returns the plugin's status after the upgrade."""
    from socklb_env import assert_no_loss, restarts_under_load

    rig.start()
    before, maps_before = pinned_links(rig.pin), map_ids(rig.pin, maps)
    assert before, "the first agent pinned its links"
    assert plugin_status(rig, plugin)["details"].get("build", "compiled") == "compiled"

    res, windows = restarts_under_load(rig, host, port, kinds=("upgrade",))
    after = pinned_links(rig.pin)
    assert {p: li.id for p, li in after.items()} == {p: li.id for p, li in before.items()}, "the same links"
    assert all(after[p].prog_id != before[p].prog_id for p in after), "every link runs the new build"
    for p, li in after.items():
        assert at_hook(li) == [li.prog_id], f"{p}: exactly the link's program at the hook"
    assert map_ids(rig.pin, maps) == maps_before, "the same maps"
    st = plugin_status(rig, plugin)
    assert_no_loss(res, windows)

    # The same build again: the new agent adopts what runs (no compile, the same programs).
    rig.stop(signal.SIGTERM)
    rig.start()
    again = pinned_links(rig.pin)
    assert {p: li.id for p, li in again.items()} == {p: li.id for p, li in after.items()}
    same = {p: li.prog_id for p, li in again.items()} == {p: li.prog_id for p, li in after.items()}
    assert same == adopts, (again, after)
    return st


def test_socklb_upgrade_between_two_agents(kernel_headers: Path) -> None:
    from socklb_env import RESTART_IP, restart_rig

    with restart_rig(f"kpr-upg-sl{os.getpid()}") as rig:
        cg_fd = os.open(rig.load_cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            def at_hook(li: links.LinkInfo) -> list[int]:
                return links.query(cg_fd, li.attach_type)

            st = upgrade_under_load(rig, RESTART_IP, 80, "socklb",
                                    ("kpr_svc", "kpr_backend", "kpr_sock_revnat", "kpr_sock_hostaddr"), at_hook,
                                    adopts=True)
            assert st["details"]["build"] == "compiled"
            assert {v["action"] for v in st["details"]["links"].values()} == {"updated"}, st["details"]["links"]
            assert plugin_status(rig, "socklb")["details"]["build"] == "adopted"
        finally:
            os.close(cg_fd)
        res = subprocess.run(["bpftool", "-j", "cgroup", "show", str(rig.load_cgroup)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert len(json.loads(res.stdout or "[]")) == 10, "bpftool: one program per hook, ten hooks"
        rig.stop(signal.SIGTERM)


def test_tc_nodeport_upgrade_between_two_agents(kernel_headers: Path) -> None:
    from tc_nodeport_env import NODES, NP_RESTART_PORT, nodeport_restart_rig

    from kpr.plugins.tc_nodeport.attach import tcx_programs
    from socklb_env import UPGRADE_KEYS

    with nodeport_restart_rig(f"kpr-upg-np{os.getpid()}") as rig:
        rig.upgrade_with(UPGRADE_KEYS["tc_nodeport"])

        def at_hook(li: links.LinkInfo) -> list[int]:
            direction = "ingress" if li.attach_type == links.ATTACH_TCX_INGRESS else "egress"
            with rig.topo["node1"].enter():
                return [pid for pid, _n in tcx_programs(li.ifindex, direction)]

        upgrade_under_load(rig, NODES["node1"]["addr"], NP_RESTART_PORT, "tc_nodeport",
                           ("kpr_svc", "kpr_backend", "kpr_ct", "kpr_snat"), at_hook,
                           adopts=True)
        assert len(list(rig.pin.glob("kpr_np_calls*"))) == 1, "the old build's stage array is unpinned"
        rig.stop(signal.SIGTERM)

