"""Compile and load BPF C through bcc, turning bcc's printed diagnostics into exceptions.

bcc reports failures as a bare `Exception` and prints the useful part (clang's
diagnostics, the verifier log) to file descriptor 2 from C++, where Python cannot catch
it. We redirect fd 2 to a temporary file around each bcc call and put what was printed
into the exception we raise.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kpr.bpf import kernctx
from kpr.bpf.headers import HeadersMissing, ensure_kernel_headers
from kpr.bpf.inline import inline_includes

if TYPE_CHECKING:  # bcc is a system package; import it lazily so `kpr` imports without it
    import bcc

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent
VERIFIER_TAIL_LINES = 30

__all__ = [
    "BPF_DIR",
    "BPFError",
    "BPFPermissionError",
    "BccMissing",
    "CompileError",
    "HeadersMissing",
    "Source",
    "VerifierError",
    "attach_type_value",
    "compile_and_load",
    "load_prog",
    "prepare",
    "prog_type_value",
]


class BPFError(RuntimeError):
    """Base of the loader's errors."""


class BccMissing(BPFError):
    """The bcc Python bindings are not importable."""


class BPFPermissionError(BPFError):
    """The kernel refused for lack of privileges (not root, no CAP_BPF/CAP_SYS_ADMIN)."""


class CompileError(BPFError):
    def __init__(self, file: str, message: str) -> None:
        self.file = file
        self.message = message
        super().__init__(f"failed to compile {file}:\n{message}")


class VerifierError(BPFError):
    def __init__(self, prog: str, file: str, reason: str, log_text: str) -> None:
        self.prog = prog
        self.file = file
        self.reason = reason
        self.log = log_text
        lines = [ln for ln in log_text.rstrip().splitlines()]
        self.log_tail = "\n".join(lines[-VERIFIER_TAIL_LINES:])
        super().__init__(f"verifier rejected {prog} ({file}): {reason}\n{self.log_tail}")


def import_bcc() -> Any:
    try:
        import bcc
    except ImportError as exc:
        raise BccMissing(
            f"bcc Python bindings not importable ({exc}); install python3-bpfcc and use a venv "
            "made with --system-site-packages"
        ) from exc
    return bcc


# fd 2 is process-wide: serialise captures so two threads do not swap each other's output.
_capture_lock = threading.Lock()


# LLVM ends the process on a fatal error (e.g. "BPF stack limit exceeded") while fd 2 is
# captured, so the capture goes to a named file that only a finished compile removes; the
# next compile in any kpr process reports what such a file holds.
CRASH_DIR = Path(tempfile.gettempdir())
_CRASH_PREFIX = "kpr-bpf-compile-"


def capture_path(pid: int | None = None) -> Path:
    """Where process `pid` (default this one) captures a compile's output."""
    return CRASH_DIR / f"{_CRASH_PREFIX}{pid or os.getpid()}.log"


def report_crashed_compiles() -> list[str]:
    """Log and remove the captured output of compiles that ended their process; returns it."""
    found = []
    for path in sorted(CRASH_DIR.glob(f"{_CRASH_PREFIX}*.log")):
        try:
            pid = int(path.stem[len(_CRASH_PREFIX) :])
        except ValueError:
            continue
        if pid == os.getpid() or Path(f"/proc/{pid}").exists():
            continue
        try:
            text = path.read_text(errors="replace").strip()
            path.unlink()
        except OSError:
            continue
        found.append(text)
        log.error("event=bpf_compile_crashed pid=%d output=%r", pid, text[-4000:] or "(nothing printed)")
    return found


@contextlib.contextmanager
def _capture_fd2() -> Iterator[list[str]]:
    """Collect everything written to fd 2 inside the block; the text lands in the yielded list."""
    out: list[str] = []
    with _capture_lock:
        path = capture_path()
        # Removed however the block ends in Python (an exception, KeyboardInterrupt, a SIGTERM
        # handler's SystemExit): only a process that died inside the compile leaves the file,
        # for the next process's report_crashed_compiles.
        try:
            with open(path, "w+b") as tmp:
                saved = os.dup(2)
                try:
                    os.dup2(tmp.fileno(), 2)
                    try:
                        yield out
                    finally:
                        # C++ stderr is unbuffered, but Python's sys.stderr may hold text.
                        with contextlib.suppress(Exception):
                            import sys

                            sys.stderr.flush()
                        os.dup2(saved, 2)
                finally:
                    os.close(saved)
                    tmp.seek(0)
                    out.append(tmp.read().decode(errors="replace"))
        finally:
            with contextlib.suppress(OSError):
                path.unlink()


def _looks_like_path(src: str) -> bool:
    return "\n" not in src and src.endswith((".c", ".h", ".bpf.c")) and Path(src).is_file()


@dataclass(frozen=True)
class Source:
    """What bcc compiles: the text with kpr's headers pasted in, the full flags, and the label
    errors name. Its `digest()` (kpr.bpf.builds) identifies the build."""

    text: str
    flags: tuple[str, ...]
    label: str

    def digest(self) -> bytes:
        from kpr.bpf.builds import digest

        return digest(self.text, self.flags)


def prepare(
    src: str | Path, *, cflags: Sequence[str] = (), include_dirs: Sequence[Path] = (), name: str = ""
) -> Source:
    """The source compile_and_load would hand bcc (no bcc, no kernel headers needed)."""
    dirs: list[Path] = [BPF_DIR]
    if isinstance(src, Path) or _looks_like_path(src):
        path = Path(src).resolve()
        text = path.read_text()
        label = name or str(path)
        # bcc compiles a file's contents as /virtual/main.c, so its directory must be explicit.
        dirs.insert(0, path.parent)
    else:
        text = src
        label = name or "<text>"
    dirs.extend(Path(d) for d in include_dirs)
    flags = [f"-I{d}" for d in dirs] + list(cflags)
    # bcc rewrites map calls only in the main text, so kpr's headers are pasted into it.
    return Source(inline_includes(text, dirs, label=label), tuple(flags), label)


def compile_and_load(
    src: str | Path | Source,
    *,
    cflags: Sequence[str] = (),
    include_dirs: Sequence[Path] = (),
    name: str = "",
    debug: int = 0,
    report_crashes: bool = True,
) -> bcc.BPF:
    """Compile BPF C (a file path, source text or a prepared Source) with bcc and return the module.

    Programs in it are loaded separately with `load_prog`. `name` labels source text in
    errors (a file's own path is used for files). Programs can include "lib/x.h" and
    "ctx/skb.h" from kpr's bpf directory; a file's own directory is searched too.
    (kpr.bpf.progcache.load_programs: the same, served from a cache of earlier compiles.)
    `report_crashes` false: earlier compiles' crashes are left for the caller to report (the
    compile child's stderr is not the agent's log).
    """
    bcc = import_bcc()
    ensure_kernel_headers()
    if report_crashes:
        report_crashed_compiles()

    source = src if isinstance(src, Source) else prepare(src, cflags=cflags, include_dirs=include_dirs, name=name)
    text, flags, label = source.text, list(source.flags), source.label
    log.debug("event=bpf_compile file=%s cflags=%s", label, flags)
    with _capture_fd2() as captured:
        try:
            # bcc wants bytes and warns about str on every call.
            module = bcc.BPF(text=text.encode(), cflags=flags, debug=debug)
        except Exception as exc:  # bcc raises bare Exception
            failure: Exception | None = exc
        else:
            failure = None
    printed = captured[0] if captured else ""
    # clang names the buffer /virtual/main.c; point the reader at the real file instead.
    printed = printed.replace("/virtual/main.c", label)

    if failure is not None:
        msg = str(failure)
        if msg.startswith("Failed to compile"):
            log.debug("event=bpf_compile_failed file=%s", label)
            raise CompileError(label, printed.strip() or msg) from failure
        # BPF() also auto-loads kprobe__/tracepoint__ functions, which can fail in the verifier.
        raise _load_failure(msg, "<autoload>", label, printed) from failure
    if printed.strip():
        log.debug("event=bpf_compile_output file=%s output=%r", label, printed.strip())
    module._kpr_label = label  # remembered for load_prog's error messages
    return module


def _load_failure(msg: str, prog: str, label: str, printed: str) -> BPFError:
    if "super-user" in msg:
        return BPFPermissionError(f"loading {prog} ({label}) needs root or CAP_BPF: {msg}")
    m = re.search(r"Failed to load BPF program (?:b')?([^':]+)'?: (.*)", msg)
    if m:
        prog = m.group(1)
        reason = m.group(2)
    else:
        reason = msg
    log.debug("event=bpf_verifier_rejected prog=%s file=%s reason=%r", prog, label, reason)
    return VerifierError(prog, label, reason, printed)


# enum bpf_prog_type (uapi: numbers never change), so that naming a program's type needs no
# libbcc (a load from kpr.bpf.progcache imports no bcc at all).
PROG_TYPES = {
    "SOCKET_FILTER": 1, "KPROBE": 2, "SCHED_CLS": 3, "SCHED_ACT": 4, "TRACEPOINT": 5, "XDP": 6,
    "PERF_EVENT": 7, "CGROUP_SKB": 8, "CGROUP_SOCK": 9, "LWT_IN": 10, "LWT_OUT": 11, "LWT_XMIT": 12,
    "SOCK_OPS": 13, "SK_SKB": 14, "CGROUP_DEVICE": 15, "SK_MSG": 16, "RAW_TRACEPOINT": 17, "CGROUP_SOCK_ADDR": 18,
}


def prog_type_value(prog_type: int | str) -> int:
    """Accept bcc's numbers or names such as "XDP", "SCHED_CLS", "CGROUP_SOCK_ADDR"."""
    if isinstance(prog_type, int):
        return prog_type
    if prog_type.upper() in PROG_TYPES:
        return PROG_TYPES[prog_type.upper()]
    bcc = import_bcc()
    try:
        return int(getattr(bcc.BPFProgType, prog_type.upper()))
    except AttributeError:
        raise ValueError(f"unknown BPF program type {prog_type!r}") from None


def attach_type_value(attach_type: int | str | None) -> int:
    if attach_type is None:
        return -1
    if isinstance(attach_type, int):
        return attach_type
    from kpr.bpf.links import CGROUP_ATTACH_TYPES  # (the cgroup hooks without importing bcc)

    if attach_type.upper() in CGROUP_ATTACH_TYPES:
        return CGROUP_ATTACH_TYPES[attach_type.upper()]
    bcc = import_bcc()
    try:
        return int(getattr(bcc.BPFAttachType, attach_type.upper()))
    except AttributeError:
        raise ValueError(f"unknown BPF attach type {attach_type!r}") from None


def load_prog(
    bpf: bcc.BPF,
    fn_name: str,
    prog_type: int | str,
    *,
    attach_type: int | str | None = None,
    device: str | None = None,
) -> Any:
    """Load one function of a compiled module as a program; returns bcc's Function (.fd, .name)."""
    label = getattr(bpf, "_kpr_label", "<text>")
    ptype = prog_type_value(prog_type)
    atype = attach_type_value(attach_type)
    # a value the compiler kept in r0 across ctx/skb.h's raw kfunc call (the verifier passes it),
    # or a use of the raw call the check cannot follow
    try:
        insns = bpf.dump_func(fn_name.encode())
    except Exception:  # noqa: BLE001 - an unknown function: load_func says so below
        insns = b""
    kept = kernctx.r0_kept_across_call(insns)
    if kept is not None:
        raise BPFError(f"{fn_name} ({label}): {kept}")
    with _capture_fd2() as captured:
        try:
            fn = bpf.load_func(fn_name.encode(), ptype, device=device.encode() if device else None, attach_type=atype)
        except Exception as exc:  # bcc raises bare Exception
            failure: Exception | None = exc
        else:
            failure = None
    printed = captured[0] if captured else ""
    if failure is not None:
        msg = str(failure)
        if msg.startswith("Unknown program"):
            raise BPFError(f"no function {fn_name!r} in {label}") from failure
        raise _load_failure(msg, fn_name, label, printed) from failure
    log.debug("event=bpf_prog_loaded prog=%s file=%s type=%s fd=%d", fn_name, label, ptype, fn.fd)
    return fn
