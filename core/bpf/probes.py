"""Feature probes: which BPF program types and helpers this kernel offers.

A helper is probed the way bpftool does it: load a program of the relevant type that
calls the helper without caring about its arguments, and read the verifier's answer.
"unknown func" or "cannot use helper" means absent; anything else (loaded, or rejected
for its arguments) means the kernel knows the helper for that program type.

Helpers whose uapi id kpr knows (HELPER_IDS) are probed without a compile, as libbpf's
libbpf_probe_bpf_helper does: three instructions (call, r0 = 0, exit) loaded by libbpf's
bpf_prog_load (kpr.bpf.maps' libbpf) with the verifier's log, read with the same markers (a compile
costs about 0.2 s of CPU, on the way to ready for socklb). Not libbpf_probe_bpf_helper itself:
libbpf 1.1 looks only for "invalid func"/"unknown func" and calls every helper present on a
kernel that says "cannot use helper" (6.18 here: all ten for every program type). A load that
fails without a verifier's word (EPERM, an unknown program type) falls back to the compile.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kpr.bpf import fs
from kpr.bpf import maps as M
from kpr.bpf.headers import HeadersMissing, ensure_kernel_headers, kernel_release
from kpr.bpf.loader import (
    BPFError,
    CompileError,
    attach_type_value,
    VerifierError,
    compile_and_load,
    import_bcc,
    load_prog,
    prog_type_value,
)

log = logging.getLogger(__name__)

# Program type each helper is probed with when the caller does not say; the attach type
# is what the kernel wants as expected_attach_type for that program type.
HELPER_PROG_TYPES: dict[str, str] = {
    "redirect_peer": "SCHED_CLS",
    "redirect_neigh": "SCHED_CLS",
    "jiffies64": "SCHED_CLS",
    "skb_adjust_room": "SCHED_CLS",
    "sk_lookup_tcp": "SCHED_CLS",
    "fib_lookup": "XDP",
    "xdp_adjust_head": "XDP",
    "get_netns_cookie": "CGROUP_SOCK_ADDR",
    "get_socket_cookie": "CGROUP_SOCK_ADDR",
}
DEFAULT_ATTACH_TYPES: dict[str, str] = {
    "CGROUP_SOCK_ADDR": "CGROUP_INET4_CONNECT",
    "CGROUP_SOCK": "CGROUP_INET_SOCK_CREATE",
}
PROG_TYPES = ("XDP", "SCHED_CLS", "CGROUP_SOCK_ADDR", "CGROUP_SOCK")

# enum bpf_func_id of the helpers kpr probes (uapi: ids never change, new helpers are
# appended); tests/test_probe_ids.py checks them against linux/bpf.h.
HELPER_IDS: dict[str, int] = {
    "xdp_adjust_head": 44,
    "get_socket_cookie": 46,
    "skb_adjust_room": 50,
    "fib_lookup": 69,
    "sk_lookup_tcp": 84,
    "jiffies64": 118,
    "get_netns_cookie": 122,
    "redirect_neigh": 152,
    "redirect_peer": 155,
    "set_retval": 187,
}

# Verifier wording for "this helper does not exist for this program type" (kernel 4.x-6.x).
_ABSENT_MARKERS = ("unknown func", "invalid func", "cannot use helper", "cannot call gpl")

_lock = threading.Lock()
_helper_cache: dict[tuple[str, str], bool] = {}


def _default_prog_type(helper: str) -> str:
    if helper in HELPER_PROG_TYPES:
        return HELPER_PROG_TYPES[helper]
    if helper.startswith("xdp_"):
        return "XDP"
    if "sock" in helper and not helper.startswith("sk_"):
        return "CGROUP_SOCK_ADDR"
    return "SCHED_CLS"


def _helper_probe_source(helpers: Iterable[str]) -> str:
    fns = []
    for h in helpers:
        # Called through a cast of its id: arguments do not matter for presence.
        fns.append(
            f"int kpr_probe_{h}(void *ctx) {{\n    long (*fn)(void) = (void *)BPF_FUNC_{h};\n    return fn() & 0;\n}}\n"
        )
    return "\n".join(fns)


def _verdict_from_load(bpf: Any, helper: str, prog_type: str) -> bool:
    try:
        fn = load_prog(bpf, f"kpr_probe_{helper}", prog_type, attach_type=DEFAULT_ATTACH_TYPES.get(prog_type))
    except VerifierError as exc:
        text = exc.log.lower()
        absent = any(m in text for m in _ABSENT_MARKERS)
        log.debug(
            "event=helper_probe helper=%s prog_type=%s present=%s reason=%r", helper, prog_type, not absent, exc.reason
        )
        return not absent
    os.close(fn.fd)
    bpf.funcs.pop(fn.name, None)
    return True


def have_helpers(helpers: Iterable[str], prog_type: str | None = None) -> dict[str, bool]:
    """Probe several helpers, compiling one program per program type."""
    names = list(dict.fromkeys(helpers))
    groups: dict[str, list[str]] = {}
    for h in names:
        groups.setdefault((prog_type or _default_prog_type(h)).upper(), []).append(h)
    result: dict[str, bool] = {}
    with _lock:
        for ptype, hs in groups.items():
            todo = [h for h in hs if (h, ptype) not in _helper_cache]
            if todo:
                _probe_group(ptype, todo)
            for h in hs:
                result[h] = _helper_cache[(h, ptype)]
    return result


def _insn(code: int, imm: int = 0) -> bytes:
    """One struct bpf_insn without registers or offset."""
    return struct.pack("<BBhi", code, 0, 0, imm)


def _raw_probe(helper: str, ptype: str) -> bool | None:
    """Whether the kernel offers `helper` to `ptype`, by loading `call helper; r0 = 0; exit`;
    None when this cannot tell (no known id, no libbpf, no verifier's word)."""
    hid = HELPER_IDS.get(helper)
    if hid is None:
        return None
    # call helper; r0 = 0 (a return value every program type accepts); exit
    insns = _insn(0x85, hid) + _insn(0xB7) + _insn(0x95)
    atype = DEFAULT_ATTACH_TYPES.get(ptype)
    log_buf = ctypes.create_string_buffer(64 * 1024)
    opts = M.ProgLoadOpts(sz=ctypes.sizeof(M.ProgLoadOpts), expected_attach_type=attach_type_value(atype) if atype else 0,
                         log_level=1, log_size=len(log_buf), log_buf=ctypes.cast(log_buf, ctypes.c_void_p))
    try:
        fd = M.libbpf().bpf_prog_load(prog_type_value(ptype), b"kpr_probe", b"GPL", insns, len(insns) // 8, ctypes.byref(opts))
    except OSError:  # no libbpf.so.1 to load it with
        return None
    if fd >= 0:
        os.close(fd)
        return True
    text = log_buf.value.decode(errors="replace").lower()
    if not text:
        return None
    absent = any(m in text for m in _ABSENT_MARKERS)
    log.debug("event=helper_probe helper=%s prog_type=%s present=%s raw=yes", helper, ptype, not absent)
    return not absent


def _probe_group(ptype: str, helpers: list[str]) -> None:
    compile_for = []
    for h in helpers:
        verdict = _raw_probe(h, ptype)
        if verdict is None:
            compile_for.append(h)
        else:
            _helper_cache[(h, ptype)] = verdict
    if compile_for:
        _compile_probe(ptype, compile_for)


def _compile_probe(ptype: str, helpers: list[str]) -> None:
    try:
        bpf = compile_and_load(_helper_probe_source(helpers), name=f"<probe {ptype}>")
    except CompileError:
        if len(helpers) > 1:
            # One helper unknown to the headers spoils the batch; find which one alone.
            for h in helpers:
                _compile_probe(ptype, [h])
            return
        log.info("event=helper_probe helper=%s prog_type=%s present=False reason=unknown_to_headers", helpers[0], ptype)
        _helper_cache[(helpers[0], ptype)] = False
        return
    try:
        for h in helpers:
            _helper_cache[(h, ptype)] = _verdict_from_load(bpf, h, ptype)
    finally:
        bpf.cleanup()


def have_helper(name: str, prog_type: str | None = None) -> bool:
    """Whether the kernel offers BPF helper `name` (without bpf_ prefix) to `prog_type`."""
    name = name.removeprefix("bpf_")
    return have_helpers([name], prog_type)[name]


@functools.cache
def have_prog_type(prog_type: str | int, attach_type: str | None = None) -> bool:
    """Whether the kernel loads a trivial program of this type."""
    ptype = prog_type if isinstance(prog_type, int) else prog_type.upper()
    if attach_type is None and isinstance(ptype, str):
        attach_type = DEFAULT_ATTACH_TYPES.get(ptype)
    prog_type_value(ptype)  # unknown names are the caller's bug, not an absent feature
    bpf = compile_and_load("int kpr_probe_type(void *ctx) { return 0; }", name=f"<probe {ptype}>")
    try:
        load_prog(bpf, "kpr_probe_type", ptype, attach_type=attach_type)
        return True
    except VerifierError as exc:
        log.info("event=prog_type_probe prog_type=%s present=False reason=%r", ptype, exc.reason)
        return False
    finally:
        bpf.cleanup()


def clear_cache() -> None:
    with _lock:
        _helper_cache.clear()
    have_prog_type.cache_clear()


# Mount lookups are not cached: ensure_bpffs/ensure_cgroup2 change the answer, and
# reading /proc/self/mounts costs microseconds.
def cgroup2_mount() -> Path | None:
    found = fs.find_mounts("cgroup2")
    return found[0] if found else None


def bpffs_mount() -> Path | None:
    found = fs.find_mounts("bpf")
    if fs.DEFAULT_BPFFS in found:
        return fs.DEFAULT_BPFFS
    return found[0] if found else None


def have_btf() -> bool:
    return Path("/sys/kernel/btf/vmlinux").is_file()


def probe_all() -> dict[str, Any]:
    """Summary of the BPF features kpr uses, for `kpr status`. Never raises."""
    summary: dict[str, Any] = {
        "kernel": kernel_release(),
        "root": os.geteuid() == 0,
        "btf": have_btf(),
        "bpffs": str(p) if (p := bpffs_mount()) else None,
        "cgroup2": str(p) if (p := cgroup2_mount()) else None,
        "bcc": None,
        "headers": None,
        "prog_types": {},
        "helpers": {},
        "errors": [],
    }
    try:
        bcc = import_bcc()
        summary["bcc"] = getattr(bcc, "__version__", "unknown")
        tree = ensure_kernel_headers()
        summary["headers"] = str(tree.build)
    except (BPFError, HeadersMissing, OSError) as exc:
        summary["errors"].append(str(exc))
        return summary
    if not summary["root"]:
        summary["errors"].append("not root: program type and helper probes need CAP_BPF/CAP_SYS_ADMIN")
        return summary
    try:
        for ptype in PROG_TYPES:
            summary["prog_types"][ptype.lower()] = have_prog_type(ptype)
        summary["helpers"] = have_helpers(HELPER_PROG_TYPES)
    except (BPFError, OSError) as exc:
        summary["errors"].append(str(exc))
    return summary
