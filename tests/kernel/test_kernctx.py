"""ctx/skb.h ctx_csum_state: a tc program reads the skb's ip_summed through the kfunc
bpf_cast_to_kern_ctx, where kpr.bpf.kernctx found it in the running kernel's BTF.

BPF_PROG_TEST_RUN builds CHECKSUM_NONE skbs: the state read must say so, and a build without
the flags must say it does not know (the NodePort rewrite then infers it, lib/csum.h).
"""

from __future__ import annotations

import struct
import subprocess

import pytest

from kpr.bpf import kernctx
from kpr.bpf.loader import BPFError, compile_and_load, load_prog
from kpr.testing.prog_run import test_run

pytestmark = pytest.mark.skipif(not kernctx.cflags(), reason="no BTF, kfunc or ip_summed on this kernel")

PROG = r"""
#include "ctx/skb.h"

int state(struct __sk_buff *ctx)
{
	__u8 s = ctx_csum_state(&ctx);

	// the context still works after it (reloaded from the stack: see ctx_csum_state)
	if (ctx_len(ctx) < 14 || !ctx_ptr(ctx, 0, 14))
		return 100;
	return s;
}
"""


@pytest.mark.parametrize(("flags", "expect"), [
    ((), 1),  # CTX_CSUM_NONE: what test_run's skb is
    (("-UKPR_SKB_KERN_CTX_FN",), 0),  # CTX_CSUM_UNKNOWN: no kfunc id given
], ids=["kernctx", "without"])
def test_a_test_run_skb_reads_as_checksum_none(flags: tuple[str, ...], expect: int) -> None:
    bpf = compile_and_load(PROG, cflags=[*kernctx.cflags(), *flags], name="<kernctx>")
    try:
        fn = load_prog(bpf, "state", "SCHED_CLS")
        assert test_run(fn.fd, bytes(64)).retval == expect
    finally:
        bpf.cleanup()


# A helper's result the compiler keeps in r0 across ctx_csum_state (no call in between, for all
# it knows): the kfunc overwrites it with the sk_buff's address, and the verifier takes the
# pointer for the number stored (root may store pointers): the map would hold a kernel address.
KEPT_IN_R0 = r"""
#include "ctx/skb.h"

BPF_ARRAY(out, __u64, 2);

int kept(struct __sk_buff *ctx)
{
	__u64 t = bpf_ktime_get_ns();
	__u8 s = ctx_csum_state(&ctx);
	__u32 zero = 0, one = 1;
	__u64 time = t, state = s; // (copies: t itself, its address not taken, may stay in r0)

	out.update(&zero, &time);
	out.update(&one, &state);
	return 0;
}
"""


def test_a_build_that_keeps_a_value_in_r0_across_the_kfunc_call_is_refused() -> None:
    bpf = compile_and_load(KEPT_IN_R0, cflags=list(kernctx.cflags()), name="<kept>")
    try:
        kept = kernctx.r0_kept_across_call(bpf.dump_func(b"kept"))
        assert kept is not None, "this compiler did not keep the value in r0: the test shows nothing"
        assert kept.why == "read", kept
        with pytest.raises(BPFError, match=f"r0 read at instruction {kept.at} "):
            load_prog(bpf, "kept", "SCHED_CLS")
    finally:
        bpf.cleanup()
    # the build the programs use (the read first) passes the check
    bpf = compile_and_load(PROG, cflags=list(kernctx.cflags()), name="<kernctx>")
    try:
        assert kernctx.r0_kept_across_call(bpf.dump_func(b"state")) is None
    finally:
        bpf.cleanup()


def test_the_offset_is_the_byte_the_verifier_reads_pkt_type_from() -> None:
    """ip_summed shares its byte with pkt_type (struct sk_buff): the verifier's rewrite of
    __sk_buff->pkt_type loads that byte, so the offset kernctx found must be the one it uses."""
    bpf = compile_and_load('#include "ctx/skb.h"\nint pt(struct __sk_buff *ctx) { return ctx->pkt_type; }',
                           name="<pkt_type>")
    try:
        fn = load_prog(bpf, "pt", "SCHED_CLS")
        info = open(f"/proc/self/fdinfo/{fn.fd}").read()
        prog_id = next(ln.split()[1] for ln in info.splitlines() if ln.startswith("prog_id"))
        raw = subprocess.run(["bpftool", "prog", "dump", "xlated", "id", prog_id, "file", "/dev/stdout"],
                             capture_output=True, check=True).stdout
    finally:
        bpf.cleanup()
    op, regs, off, _imm = struct.unpack_from("<BBhi", raw, 0)
    assert op == 0x71 and regs >> 4 == 1, "the first instruction loads a byte of the context"  # BPF_LDX|BPF_MEM|BPF_B
    assert f"-DKPR_SKB_IP_SUMMED_OFF={off}" in kernctx.cflags()


def refuse_the_kfunc_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags naming a BTF id that is no kfunc: the verifier refuses the read's build, as a JIT
    without kfunc calls would (or load_prog, for a compiler that kept a value in r0)."""
    real = kernctx.cflags()
    bogus = tuple("-DKPR_SKB_KERN_CTX_FN=1" if f.startswith("-DKPR_SKB_KERN_CTX_FN=") else f for f in real)
    monkeypatch.setattr(kernctx, "cflags", lambda: bogus)


def test_a_kernel_that_refuses_the_kfunc_call_gets_the_build_without_it(
    pin_dir, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    # (a JIT without kfunc calls, or a compiler that kept a value in r0-r5 across the call:
    # here a BTF id that is no kfunc, which the verifier refuses as they would be)
    from kpr.plugins.tc_nodeport import datapath as TD
    from kpr.servicemaps import ServiceMapWriter

    refuse_the_kfunc_call(monkeypatch)
    with ServiceMapWriter(pin_dir):
        dp = TD.Datapath(pin_dir, mode="snat")
        with caplog.at_level("WARNING", logger="kpr.nodeport.datapath"):
            dp.load()
        try:
            assert dp.build == "compiled" and not dp.kernctx
            assert all(not f.startswith("-DKPR_SKB_") for f in dp.cflags())
            assert any("event=kernctx_fallback" in r.getMessage() for r in caplog.records)
            assert dp.fd(TD.INGRESS) > 0
        finally:
            dp.close()


def test_a_restart_after_the_fallback_adopts_the_build_without_the_read(
    kernel_headers, pin_dir, topology, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """The fallback's build is what the links run and what is recorded: the next start must
    find it among its candidates (the read's build is refused there again), not compile and
    replace the running programs on every restart."""
    from tc_nodeport_env import build_topology, node_harness, start_plugin

    from kpr.plugins.tc_nodeport import datapath as TD

    refuse_the_kfunc_call(monkeypatch)
    build_topology(topology, second_device=False, pods=("p1a",))
    with node_harness(topology, "node1", pin_dir, ("eth0",)) as h:
        p1 = start_plugin(h)
        assert p1.datapath.build == "compiled" and not p1.datapath.kernctx
        ids = {n: p1.datapath.prog_id(n) for n in TD.Datapath.ENTRIES}
        h.stop(p1)  # the links stay, running the fallback's build
        first = len(caplog.records)
        with caplog.at_level("INFO", logger="kpr"):
            p2 = start_plugin(h)
        assert p2.datapath.build == "adopted" and not p2.datapath.kernctx
        assert {n: p2.datapath.prog_id(n) for n in TD.Datapath.ENTRIES} == ids
        assert all(not f.startswith("-DKPR_SKB_") for f in p2.datapath.cflags())
        messages = [r.getMessage() for r in caplog.records[first:]]
        assert any("event=build_adopted" in m for m in messages)
        assert not any("event=kernctx_fallback " in m for m in messages), "no compile, so no refused build"
        # the fallback may have been transient: the restart keeps it, and says so once
        adopted = [r for r in caplog.records[first:] if "event=kernctx_fallback_adopted" in r.getMessage()]
        assert [r.levelname for r in adopted] == ["WARNING"], messages
        assert p2.kpr_status().details["kernctx"] is False


def test_a_normal_start_reports_the_read(kernel_headers, pin_dir, topology) -> None:
    """Where the kernel has the kfunc (this module's condition), the tc build reads the
    checksum state and status says so (the restart test above shows the fallback's false)."""
    from tc_nodeport_env import build_topology, node_harness, start_plugin

    build_topology(topology, second_device=False, pods=("p1a",))
    with node_harness(topology, "node1", pin_dir, ("eth0",)) as h:
        p = start_plugin(h)
        assert p.datapath.build == "compiled" and p.datapath.kernctx
        assert p.kpr_status().details["kernctx"] is True
