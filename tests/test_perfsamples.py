"""kpr.testing.perfsamples: `perf script` samples counted where a test run's program ran (the
parser benchmarks/profile_nodeport.py reads perf's output with), on perf's own text layout."""

from __future__ import annotations

from kpr.testing.perfsamples import parse, program_name, program_tag

INGRESS = "bpf_prog_6e42ce625c576c08_kpr_xnp_ingress"
SCRIPT = f"""\
python3  2655 [001] 37488.424586:     250000 cpu-clock:ppp: 
\tffffffffc0a407d3 {INGRESS}+0x7d3 (bpf_prog_6e42ce625c576c08_kpr_xnp_ingress)
\tffffffff81d4b1f0 bpf_test_run+0x110 ([kernel.kallsyms])
\tffffffff81d4c2a0 bpf_prog_test_run_xdp+0x2c0 ([kernel.kallsyms])

python3  2655 [001] 37488.424836:     250000 cpu-clock:ppp: 
\tffffffffc0a407d3 {INGRESS}+0x7d3 (bpf_prog_6e42ce625c576c08_kpr_xnp_ingress)
\tffffffff81d4b1f0 bpf_test_run+0x110 ([kernel.kallsyms])

python3  2655 [001] 37488.425086:     250000 cpu-clock:ppp: 
\tffffffffc0a40100 {INGRESS}+0x100 (bpf_prog_6e42ce625c576c08_kpr_xnp_ingress)
\tffffffff81d4b1f0 bpf_test_run+0x110 ([kernel.kallsyms])

python3  2655 [001] 37488.425336:     250000 cpu-clock:ppp: 
\tffffffff81402e10 htab_map_hash+0x40 ([kernel.kallsyms])
\tffffffff81403000 __htab_map_lookup_elem+0x20 ([kernel.kallsyms])
\tffffffffc0a40200 {INGRESS}+0x200 (bpf_prog_6e42ce625c576c08_kpr_xnp_ingress)
\tffffffff81d4b1f0 bpf_test_run+0x110 ([kernel.kallsyms])

python3  2655 [001] 37488.425586:     250000 cpu-clock:ppp: 
\tffffffff8161bfe0 __pte_offset_map_lock+0xa0 ([kernel.kallsyms])
\tffffffff815ff2ff unmap_page_range+0x3ef ([kernel.kallsyms])
python3  2655 [001] 37488.425836:     250000 cpu-clock:ppp: 
\t    7f0a1b2c3d4e [unknown] (/usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0)
"""


def test_samples_under_a_test_run_count_by_their_leaf_and_programs_by_offset() -> None:
    p = parse(SCRIPT.splitlines())
    assert (p.samples, p.in_run) == (6, 4)  # (the last two: no bpf_test_run frame; one with no blank line before the next)
    assert p.leaves == {INGRESS: 3, "htab_map_hash": 1}
    assert p.share(INGRESS) == 0.75
    assert p.offsets == {INGRESS: {0x7d3: 2, 0x100: 1}}  # (a helper's offsets are not kept)
    assert p.hottest(INGRESS, 1) == [(0x7d3, 2 / 3)]


def test_a_program_is_named_by_its_jit_symbol_only() -> None:
    assert program_name(INGRESS) == "kpr_xnp_ingress"
    assert program_name("htab_map_hash") is None
    assert program_name("bpf_prog_nothex_kpr") is None
    assert program_tag(INGRESS) == "6e42ce625c576c08"
    assert program_tag("htab_map_hash") is None


def test_nothing_to_read_is_an_empty_profile() -> None:
    p = parse([])
    assert (p.samples, p.in_run, p.share(INGRESS), p.hottest(INGRESS, 3)) == (0, 0, 0.0, [])
