"""One definition of the map sizes: kpr.bpf.maps.SPECS. Programs get them as -D flags; the
#ifndef fallbacks in lib/*.h must say the same, and every bpf.mapSizes key names a map."""

from __future__ import annotations

import re
from pathlib import Path

from kpr.bpf import maps as M
from kpr.config import BpfSection, parse_config
from kpr.servicemaps.slots import size_class

LIB = Path(M.__file__).parent / "lib"


def header_defaults() -> dict[str, str]:
    out = {}
    for h in sorted(LIB.glob("*.h")):
        text = h.read_text()
        for macro, value in re.findall(r"#ifndef (KPR_\w+)\n#define \1 (\S+)", text):
            out[macro] = value
    return out


def test_header_fallbacks_equal_the_python_specs():
    defaults = header_defaults()
    for spec in M.SPECS.values():
        if spec.macro:
            assert defaults.get(spec.macro) == str(spec.max_entries), (spec.name, spec.macro)
    assert defaults["KPR_MAGLEV_M"] == str(M.MAGLEV_DEFAULT_SIZE)
    assert defaults["KPR_PIN_PATH"] == f'"{BpfSection().pin_path}"'


def test_cflags_pass_every_size():
    flags = M.cflags("/sys/fs/bpf/kpr")
    for spec in M.SPECS.values():
        if spec.macro:
            assert f"-D{spec.macro}={spec.max_entries}" in flags


def test_every_map_sizes_key_names_a_spec():
    keys = ("kprSvc", "kprBackend", "kprRevnat", "kprAffinity", "kprMaglev", "kprSrcrange", "kprSlots")
    cfg = parse_config("bpf: {mapSizes: {%s}}" % ", ".join(f"{k}: {2048 + i}" for i, k in enumerate(keys)))
    sizes = cfg.bpf.map_size_overrides()
    assert set(sizes) <= set(M.SPECS)
    assert M.specs_with(sizes)["kpr_maglev"].max_entries == 2052
    assert M.specs_with(sizes)["kpr_srcrange"].max_entries == 2053


def test_defaults_hold_10k_services_x_10_endpoints_on_paper():
    # every service a ClusterIP, a third also a NodePort on two node addresses plus the
    # wildcard entry: a kpr_svc entry and a range of 10 slots (size class 12) per frontend;
    # one backend per endpoint.
    frontends = 10_000 + 3334 * 3
    assert frontends <= M.SPECS["kpr_svc"].max_entries
    assert frontends * size_class(10) <= M.SPECS["kpr_slots"].max_entries - 1
    assert 100_000 <= M.SPECS["kpr_backend"].max_entries
    assert 10_000 + 3334 * 3 <= M.SPECS["kpr_revnat"].max_entries


def test_the_readmes_50k_example_is_a_valid_config():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = readme.split("**A worked example: 50k services.**", 1)[1]
    block = example.split("```yaml\n", 1)[1].split("```", 1)[0]
    sizes = parse_config(block).bpf.map_size_overrides()
    assert sizes == {"kpr_slots": 1310720, "kpr_backend": 655360, "kpr_revnat": 131072}
    # 86,000 service entries fit the default; 960,000 slots (80,000 ranges of 12) and 500,000
    # backends fit with room for rollouts
    assert M.SPECS["kpr_svc"].max_entries >= 86_000 * 1.25
    assert sizes["kpr_slots"] >= 80_000 * size_class(10) * 1.25 and sizes["kpr_backend"] >= 500_000 * 1.25
