"""The verifier's walk (bpf_prog_info.verified_insns) of every program of NodePort builds, tc and
XDP: how near each stage is to the verifier's 1,000,000 (an E2BIG refusal). No timing.

    python benchmarks/verifier_walk.py [--hooks xdp,tc] [--build NAME=-DFLAG,-DFLAG ...]

Default builds: the default, and each of KPR_NP_SNAT_SLOTS=1, the per-field rewrite
(KPR_REWRITE_ONE_CSUM=0) and KPR_NP_CT_SLOTS=1 alone and with KPR_NP_SNAT_SLOTS=1.
"""

from __future__ import annotations

import argparse
import json

from kpr.bpf import maps as M
from kpr.testing.nodeport_bench import ProgLab

BUILDS = {
    "default": [],
    "snat slots": ["-DKPR_NP_SNAT_SLOTS=1"],
    "per-field rewrite": ["-DKPR_REWRITE_ONE_CSUM=0"],
    "per-field rewrite, snat slots": ["-DKPR_REWRITE_ONE_CSUM=0", "-DKPR_NP_SNAT_SLOTS=1"],
    "ct slots": ["-DKPR_NP_CT_SLOTS=1"],
    "ct slots, snat slots": ["-DKPR_NP_CT_SLOTS=1", "-DKPR_NP_SNAT_SLOTS=1"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hooks", default="xdp,tc")
    ap.add_argument("--build", action="append", default=[], metavar="NAME=-DFLAG,...",
                    help="builds of your own in place of the default list")
    a = ap.parse_args()
    builds = dict(BUILDS)
    if a.build:
        builds = {}
        for b in a.build:
            name, _, flags = b.partition("=")
            if not name:
                ap.error(f"--build {b!r}: NAME=-DFLAG,... expected")
            builds[name] = [f for f in flags.split(",") if f]
    with ProgLab(10) as pl:
        for hook in a.hooks.split(","):
            if hook not in ("tc", "xdp"):
                ap.error(f"--hooks: {hook!r} is neither tc nor xdp")
            for name, flags in builds.items():
                label = f"{hook}: {name}"
                try:
                    dp = pl.load(hook, label, flags)
                except Exception as e:  # the loader's error carries the verifier's complaint
                    print(json.dumps({"hook": hook, "build": name, "refused": (str(e).splitlines() or [""])[-1][:200]}))
                    continue
                try:
                    walk = {p: M.prog_info(dp.fd(p)).verified_insns for p in dp.progs}
                finally:
                    pl.builds.pop(label).close()
                print(json.dumps({"hook": hook, "build": name, "verified_insns": walk}), flush=True)


if __name__ == "__main__":
    main()
