"""Run BPF programs on packets with BPF_PROG_TEST_RUN, and table-driven packet tests.

bcc does not wrap BPF_PROG_TEST_RUN; libbpf.so.1's bpf_prog_test_run_opts does, so we
call it through kpr.bpf.maps' ctypes binding (libbpf(), ProgTestRunOpts) with a program fd
from bcc.

Note for benchmarks: with repeat > 1 the kernel does not restore the packet between
runs, so a program that rewrites its packet sees its own output from the second run on.
"""

from __future__ import annotations

import contextlib
import ctypes
import difflib
import logging
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kpr.bpf.maps import ProgTestRunOpts, libbpf

log = logging.getLogger(__name__)

# Verdicts (uapi/linux/bpf.h, uapi/linux/pkt_cls.h).
XDP_ABORTED = 0
XDP_DROP = 1
XDP_PASS = 2
XDP_TX = 3
XDP_REDIRECT = 4
TC_ACT_UNSPEC = -1
TC_ACT_OK = 0
TC_ACT_RECLASSIFY = 1
TC_ACT_SHOT = 2
TC_ACT_PIPE = 3
TC_ACT_STOLEN = 4
TC_ACT_QUEUED = 5
TC_ACT_REPEAT = 6
TC_ACT_REDIRECT = 7

XDP_VERDICTS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
TC_VERDICTS = {
    -1: "TC_ACT_UNSPEC",
    0: "TC_ACT_OK",
    1: "TC_ACT_RECLASSIFY",
    2: "TC_ACT_SHOT",
    3: "TC_ACT_PIPE",
    4: "TC_ACT_STOLEN",
    5: "TC_ACT_QUEUED",
    6: "TC_ACT_REPEAT",
    7: "TC_ACT_REDIRECT",
}

# Room for programs that grow the packet (encapsulation); the kernel fails with ENOSPC
# rather than truncating silently when the output does not fit.
DEFAULT_OUT_ROOM = 4096

__all__ = [
    "TC_ACT_OK",
    "TC_ACT_REDIRECT",
    "TC_ACT_SHOT",
    "TC_ACT_UNSPEC",
    "XDP_ABORTED",
    "XDP_DROP",
    "XDP_PASS",
    "XDP_REDIRECT",
    "XDP_TX",
    "Case",
    "RunResult",
    "checksum_problems",
    "run_cases",
    "test_run",
    "verdict_name",
]


@dataclass(frozen=True)
class RunResult:
    retval: int  # as the kernel returns it (u32); see .signed for tc's TC_ACT_UNSPEC
    data_out: bytes
    duration_ns: int  # kernel-measured average per repetition
    ctx_out: bytes | None = None

    @property
    def signed(self) -> int:
        return self.retval - (1 << 32) if self.retval & 0x80000000 else self.retval


@contextlib.contextmanager
def one_cpu() -> Iterator[None]:
    """The calling process on one CPU (its highest allowed) until the block ends.

    BPF_PROG_TEST_RUN runs on the caller's CPU, and the kernel keeps per-CPU state a test may
    count on: an LRU hash's per-CPU free lists (a process that migrates mid-fill leaves up to
    128 free elements in the other CPU's list, so the map evicts before it is full) and per-CPU
    connection tables (a flow's packets must run where its first one did)."""
    was = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(was)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, was)


def test_run(
    prog_fd: int,
    data: bytes,
    repeat: int = 1,
    ctx: bytes | None = None,
    *,
    out_room: int = DEFAULT_OUT_ROOM,
    flags: int = 0,
    cpu: int = 0,
) -> RunResult:
    """Run the program once (or `repeat` times) on `data` and return verdict and output."""
    data = bytes(data)
    in_buf = ctypes.create_string_buffer(data, len(data))
    out_size = len(data) + out_room
    out_buf = ctypes.create_string_buffer(out_size)
    opts = ProgTestRunOpts()
    opts.sz = ctypes.sizeof(ProgTestRunOpts)
    opts.data_in = ctypes.cast(in_buf, ctypes.c_void_p)
    opts.data_size_in = len(data)
    opts.data_out = ctypes.cast(out_buf, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    opts.flags = flags
    opts.cpu = cpu
    ctx_out_buf = None
    if ctx is not None:
        ctx_in_buf = ctypes.create_string_buffer(ctx, len(ctx))
        # The kernel writes back its whole context struct (ENOSPC if it does not fit),
        # however little of it the caller passed in.
        ctx_out_size = len(ctx) + 1024
        ctx_out_buf = ctypes.create_string_buffer(ctx_out_size)
        opts.ctx_in = ctypes.cast(ctx_in_buf, ctypes.c_void_p)
        opts.ctx_size_in = len(ctx)
        opts.ctx_out = ctypes.cast(ctx_out_buf, ctypes.c_void_p)
        opts.ctx_size_out = ctx_out_size
    rc = libbpf().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = -rc if rc < 0 else ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN prog_fd={prog_fd}: {os.strerror(err)}")
    result = RunResult(
        retval=opts.retval,
        data_out=out_buf.raw[: opts.data_size_out],
        duration_ns=opts.duration,
        ctx_out=ctx_out_buf.raw[: opts.ctx_size_out] if ctx_out_buf is not None else None,
    )
    log.debug(
        "event=prog_test_run prog_fd=%d len_in=%d len_out=%d retval=%d duration_ns=%d repeat=%d",
        prog_fd,
        len(data),
        len(result.data_out),
        result.retval,
        result.duration_ns,
        repeat,
    )
    return result


# Named like a test: keep pytest from collecting it where a test module imports it.
test_run.__test__ = False  # type: ignore[attr-defined]


def verdict_name(value: int, kind: str | None = None) -> str:
    signed = value - (1 << 32) if value & 0x80000000 else value
    if kind == "xdp":
        return XDP_VERDICTS.get(signed, str(signed))
    if kind == "tc":
        return TC_VERDICTS.get(signed, str(signed))
    names = {n for n in (XDP_VERDICTS.get(signed), TC_VERDICTS.get(signed)) if n}
    return f"{signed} ({'/'.join(sorted(names))})" if names else str(signed)


# ---------------------------------------------------------------- checksums, from raw bytes
#
# Verified on the bytes rather than by rebuilding with scapy: scapy re-serialises quoted
# (truncated) headers inside ICMP errors with defaults, which would change the bytes the
# outer checksum covers.


def _fold(total: int) -> int:
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _sum16(buf: bytes) -> int:
    if len(buf) % 2:
        buf += b"\x00"
    return sum(struct.unpack(f"!{len(buf) // 2}H", buf))


def _csum(buf: bytes, initial: int = 0) -> int:
    """Internet checksum of buf as it would be written into the (zeroed) field."""
    return (~_fold(initial + _sum16(buf))) & 0xFFFF


def _with_zero(buf: bytes, off: int) -> bytes:
    return buf[:off] + b"\x00\x00" + buf[off + 2 :]


class _Checker:
    def __init__(self, data: bytes, allow_zero_udp6: bool) -> None:
        self.data = data
        self.problems: list[str] = []
        self.allow_zero_udp6 = allow_zero_udp6

    def _check(self, what: str, off: int, covered: bytes, field_off: int, pseudo: int = 0) -> None:
        have = struct.unpack_from("!H", covered, field_off)[0]
        want = _csum(_with_zero(covered, field_off), pseudo)
        # 0x0000 and 0xffff are the same value in ones' complement.
        if have != want and not (want == 0 and have == 0xFFFF) and not (want == 0xFFFF and have == 0):
            self.problems.append(f"{what} checksum at offset {off + field_off}: 0x{have:04x}, expected 0x{want:04x}")

    def ether(self, off: int, depth: int = 0) -> None:
        d = self.data
        if len(d) < off + 14 or depth > 4:
            return
        etype = struct.unpack_from("!H", d, off + 12)[0]
        off += 14
        while etype in (0x8100, 0x88A8) and len(d) >= off + 4:
            etype = struct.unpack_from("!H", d, off + 2)[0]
            off += 4
        self.l3(etype, off, depth)

    def l3(self, etype: int, off: int, depth: int) -> None:
        if etype == 0x0800:
            self.ipv4(off, quoted=False, depth=depth)
        elif etype == 0x86DD:
            self.ipv6(off, quoted=False, depth=depth)

    def ipv4(self, off: int, *, quoted: bool, depth: int) -> None:
        d = self.data
        if len(d) < off + 20:
            if not quoted:
                self.problems.append(f"IPv4 header truncated at offset {off}")
            return
        ihl = (d[off] & 0x0F) * 4
        if ihl < 20 or len(d) < off + ihl:
            self.problems.append(f"IPv4 header length {ihl} invalid at offset {off}")
            return
        self._check("IPv4 header" + (" (quoted)" if quoted else ""), off, d[off : off + ihl], 10)
        if quoted:
            return  # an ICMP error quotes only the start of the L4 header
        total = struct.unpack_from("!H", d, off + 2)[0]
        end = off + total
        if total < ihl or end > len(d):
            self.problems.append(f"IPv4 total length {total} at offset {off} exceeds the {len(d) - off} bytes present")
            return
        frag = struct.unpack_from("!H", d, off + 6)[0]
        if frag & 0x3FFF:
            return  # a fragment's L4 checksum covers bytes we do not have
        proto = d[off + 9]
        pseudo = _sum16(d[off + 12 : off + 20]) + proto + (total - ihl)
        self.l4(proto, off + ihl, end, pseudo, v6=False, depth=depth)

    def ipv6(self, off: int, *, quoted: bool, depth: int) -> None:
        d = self.data
        if len(d) < off + 40:
            if not quoted:
                self.problems.append(f"IPv6 header truncated at offset {off}")
            return
        if quoted:
            return  # IPv6 has no header checksum; the quoted L4 is partial
        plen = struct.unpack_from("!H", d, off + 4)[0]
        end = off + 40 + plen
        if end > len(d):
            self.problems.append(f"IPv6 payload length {plen} at offset {off} exceeds the bytes present")
            return
        nh = d[off + 6]
        cur = off + 40
        while nh in (0, 43, 60, 44) and cur + 8 <= end:
            if nh == 44:
                return  # fragment
            nh, hlen = d[cur], (d[cur + 1] + 1) * 8
            cur += hlen
        l4len = end - cur
        pseudo = _sum16(d[off + 8 : off + 40]) + (l4len >> 16) + (l4len & 0xFFFF) + nh
        self.l4(nh, cur, end, pseudo, v6=True, depth=depth)

    def l4(self, proto: int, off: int, end: int, pseudo: int, *, v6: bool, depth: int) -> None:
        d = self.data
        seg = d[off:end]
        if proto == 6 and len(seg) >= 20:
            self._check("TCP", off, seg, 16, pseudo)
        elif proto == 17 and len(seg) >= 8:
            if struct.unpack_from("!H", seg, 6)[0] == 0:
                if v6 and not self.allow_zero_udp6:
                    self.problems.append(f"UDP over IPv6 with zero checksum at offset {off + 6}")
            else:
                self._check("UDP", off, seg, 6, pseudo)
            dport = struct.unpack_from("!H", seg, 2)[0]
            if dport == 4789 and len(seg) >= 16:  # VXLAN
                self.ether(off + 16, depth + 1)
            elif dport == 6081 and len(seg) >= 16:  # Geneve
                opt_len = (seg[8] & 0x3F) * 4
                if struct.unpack_from("!H", seg, 10)[0] == 0x6558:
                    self.ether(off + 16 + opt_len, depth + 1)
        elif proto == 1 and len(seg) >= 8:
            self._check("ICMP", off, seg, 2)
            if seg[0] in (3, 5, 11, 12):
                self.ipv4(off + 8, quoted=True, depth=depth)
        elif proto == 58 and len(seg) >= 8:
            self._check("ICMPv6", off, seg, 2, pseudo)
        elif proto == 4:
            self.ipv4(off, quoted=False, depth=depth + 1)
        elif proto == 41:
            self.ipv6(off, quoted=False, depth=depth + 1)


def checksum_problems(frame: bytes, *, allow_zero_udp6: bool = False) -> list[str]:
    """IPv4 header, TCP, UDP, ICMP and ICMPv6 checksums in an Ethernet frame that are wrong.

    Walks VLAN tags, IPIP/IP6IP6/4in6, VXLAN and Geneve inner frames, and the quoted IPv4
    header of ICMP errors. Returns one sentence per bad checksum (empty when all are right).
    """
    c = _Checker(bytes(frame), allow_zero_udp6)
    c.ether(0)
    return c.problems


# ---------------------------------------------------------------- table-driven cases

Check = Callable[[Any], Any]


@dataclass
class Case:
    """One packet through the program: what it should decide and what should come out.

    output: a scapy packet (or bytes) the output must equal byte for byte; a callable given
    the output parsed as scapy Ether (it asserts, or returns False to fail); or None.
    """

    description: str
    packet: Any  # scapy Packet or bytes
    verdict: int
    output: Any | Check | None = None
    check_checksums: bool = True
    ctx: bytes | None = None
    allow_zero_udp6: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # free for the test's own use


def _show(frame: bytes) -> list[str]:
    from scapy.layers.l2 import Ether

    return str(Ether(frame).show2(dump=True)).splitlines()


def _diff(expected: bytes, actual: bytes) -> str:
    pairs = enumerate(zip(expected, actual, strict=False))
    first = next((i for i, (a, b) in pairs if a != b), min(len(expected), len(actual)))
    lines = difflib.unified_diff(_show(expected), _show(actual), "expected", "actual", lineterm="", n=2)
    return f"first difference at byte {first} (expected {len(expected)} bytes, got {len(actual)})\n" + "\n".join(lines)


def _run_case(prog_fd: int, case: Case, kind: str | None) -> tuple[RunResult, list[str]]:
    data = bytes(case.packet)
    res = test_run(prog_fd, data, ctx=case.ctx)
    failures: list[str] = []
    want = case.verdict & 0xFFFFFFFF
    if res.retval != want:
        failures.append(f"verdict {verdict_name(res.retval, kind)}, expected {verdict_name(want, kind)}")
    out = case.output
    if out is not None:
        if callable(out) and not isinstance(out, (bytes, bytearray)) and not hasattr(out, "build"):
            from scapy.layers.l2 import Ether

            try:
                ok = out(Ether(res.data_out))
            except AssertionError as exc:
                failures.append(f"output check failed: {exc}")
            else:
                if ok is False:
                    failures.append("output check returned False:\n" + "\n".join(_show(res.data_out)))
        else:
            expected = bytes(out)
            if res.data_out != expected:
                failures.append("output differs: " + _diff(expected, res.data_out))
    if case.check_checksums:
        failures.extend(checksum_problems(res.data_out, allow_zero_udp6=case.allow_zero_udp6))
    return res, failures


def run_cases(prog_fd: int, cases: Iterable[Case], *, kind: str | None = None) -> list[RunResult]:
    """Run every case and raise one AssertionError listing all that failed.

    kind ("xdp" or "tc") only makes verdict names in messages unambiguous.
    """
    results: list[RunResult] = []
    report: list[str] = []
    cases = list(cases)
    for i, case in enumerate(cases):
        res, failures = _run_case(prog_fd, case, kind)
        results.append(res)
        if failures:
            details = "\n  ".join(f.replace("\n", "\n    ") for f in failures)
            report.append(f"case {i}: {case.description}\n  {details}")
    if report:
        raise AssertionError(f"{len(report)} of {len(cases)} cases failed:\n" + "\n".join(report))
    return results
