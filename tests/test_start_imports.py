"""What `kpr run` pays before the files source starts (issue 11, time to ready): every agent
start imports and sets up this much before the source's first pass, the longest step to ready.

In a fresh interpreter, the real command path (`kpr.cli.main(["run", ...])`, the benchmark's
agent: files source, socklb and the service map writer) runs up to the source's start, as on
an idle machine (the early first pass, before any plugin's start: nothing is attached), and
reports what it had imported and whether the start-up imports were frozen out of the cyclic
collector's reach (kpr.memory.paused(freeze=True)). No root needed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import gc, json, os, sys

collections = []  # the cyclic collector's runs, by generation, from before kpr.cli's import
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))

def frozen(obj):
    # in the permanent generation, not walked by any collection
    return all(id(obj) != id(o) for generation in range(3) for o in gc.get_objects(generation))

import kpr.cli
import kpr.config
# importing kpr.cli (every command, every test process) freezes nothing: `kpr run` does
config_frozen_at_import = frozen(kpr.config.KprConfig)
import kpr.daemon as daemon

def at_source_start(self):
    print(json.dumps({
        "modules": sorted(sys.modules),
        "config_frozen_at_import": config_frozen_at_import,
        "config_frozen": frozen(kpr.config.KprConfig),
        "agent_frozen": frozen(daemon.Agent),
        "collections": collections,
    }), flush=True)
    os._exit(0)

daemon.Agent._start_source = at_source_start
daemon.spare_core = lambda: (True, 0.0, 2)  # the early first pass: the source before any plugin starts
sys.exit(kpr.cli.main(["run", "--config", sys.argv[1]]))
"""

# Not needed before the source starts when the source is files: the kubernetes client (the
# kubernetes source), exabgp (announce_bgp), scapy (announce_arp), bcc (a plugin's compile,
# at its start).
NOT_BEFORE_SOURCE = ("kubernetes", "exabgp", "scapy", "bcc", "kpr.sources.kubernetes", "kpr.kube")


# Collections from the interpreter's start to the files source's start: 73 without the
# start-up pauses (c66d2f0), 16 with them (counted from kpr.cli's import here: fewer).
COLLECTIONS_BOUND = 30


def start_up_to_source(tmp_path: Path) -> dict:
    manifests = tmp_path / "m"
    manifests.mkdir()
    cgroup = tmp_path / "cg"  # checked at socklb's start, which this run never reaches
    cgroup.mkdir()
    cfg = tmp_path / "kpr.yaml"
    cfg.write_text(
        f"""
node: {{name: node0, addresses: [192.168.0.10], devices: [lo]}}
source: {{kind: files, path: {manifests}, statePath: {tmp_path}/alloc.json}}
service: {{clusterCIDR: [10.96.0.0/12]}}
bpf: {{pinPath: {tmp_path}/pins}}
api: {{socket: {tmp_path}/kpr.sock}}
metrics: {{address: ""}}
log: {{level: warning}}
agent: {{stateDir: {tmp_path}/state}}
plugins:
  socklb: {{enabled: true, cgroupPath: {cgroup}}}
"""
    )
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(cfg)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_run_imports_before_the_files_source(tmp_path: Path) -> None:
    seen = start_up_to_source(tmp_path)
    modules = set(seen["modules"])
    assert "kpr.sources.files" in modules  # the path ran as far as the source
    early = sorted(m for m in modules for p in NOT_BEFORE_SOURCE if m == p or m.startswith(p + "."))
    assert early == [], f"imported before the files source starts: {early}"
    # The start-up imports' objects (classes, functions, modules) live as long as the
    # process: frozen, no collection walks them again.
    assert not seen["config_frozen_at_import"], "importing kpr.cli froze the heap (kpr run's business)"
    assert seen["config_frozen"], "kpr.cli's imports were not frozen"
    assert seen["agent_frozen"], "kpr.daemon's imports were not frozen"
    # the point of pausing the collector for the imports: 73 collections otherwise, 16 with
    assert len(seen["collections"]) <= COLLECTIONS_BOUND, seen["collections"]


FREEZE_SCRIPT = """
import gc
from kpr import memory

gc.collect()
gc.freeze()
base = gc.get_freeze_count()
with memory.paused():
    with memory.paused(freeze=True):  # asked inside: honoured when the outermost pause ends
        made = [[i] for i in range(1000)]  # far fewer than memory.FREEZE_AFTER
    assert gc.get_freeze_count() == base, "froze before the outermost pause ended"
assert gc.get_freeze_count() >= base + 1000 and gc.isenabled(), (gc.get_freeze_count() - base, gc.isenabled())
frozen = gc.get_freeze_count()
with memory.paused():
    more = [[i] for i in range(1000)]
assert gc.get_freeze_count() == frozen, "a later pause without freeze froze too"
print("ok")
"""


def test_a_pause_asked_to_freeze_freezes_what_its_block_made_once() -> None:
    # a fresh interpreter: no other thread's pause (an earlier test's) is under way
    out = subprocess.run([sys.executable, "-c", FREEZE_SCRIPT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
