"""The files source's read-ahead in a process of its own (`python -m kpr.sources.files_worker FD`).

The agent is one core's worth of Python under the GIL: reading, checking and packing 20k
services' manifests on a thread of the agent (0.9 s of CPU) competed with the plugins' start
and the first pass. Here a spawned process (not forked from the threaded agent) runs the
source's own _load_file on each file, the code a read-ahead in the agent runs, and streams
each file's result back: the packed objects with what validation read of them (for
translate.remember_checked), the file's errors, and its log lines, which the agent logs as
its own. The agent only unpickles (a fifth of the CPU) and keeps reading anything the worker
did not deliver itself (FilesSource._read_ahead_in_worker): a worker that fails costs time,
never a file.

It serves the read-ahead (while the plugins start) and a first pass without one (the agent
runs that pass while the plugins start when a core is idle); later passes read in the agent.

Protocol: the job on stdin, a 4-byte length (big-endian) and a pickle: {"path",
"max_file_size", "cluster_cidrs", "files": [(name, signature)] as the agent listed them,
"places"} (the agent's table of endpoint places, kpr.model.places, so the ids in a slice's
reading are the agent's); the agent closing stdin asks the worker to stop after the file it
is at. Messages, on the file descriptor named on the command line, each a length and a
pickle: ("file", name, result, new_places, log_records), result being None (a file still
being written: the pass reads it) or (sig, errors, failed, service_keys, [(ref, packed,
checked)]); then ("done", cpu_seconds, peak_rss_kb).
"""

from __future__ import annotations

import copyreg
import io
import logging
import os
import pickle
import resource
import struct
import sys
import time
import traceback
from typing import Any

from kpr.childcmd import python_module

HEADER = struct.Struct(">I")


def peak_rss_kb() -> int:
    """VmHWM of this process, in kB (0 when /proc cannot tell)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class _Cidrs:
    """What _load_file asks of the source's Allocator: service.clusterCIDR, as the agent has it."""

    def __init__(self, cluster_cidrs: tuple[str, ...]) -> None:
        self.cluster_cidrs = cluster_cidrs


class _ShippedLog:
    """_load_file's log, as (level, msg, args, exc_text, pathname, lineno, funcName, time) for the
    agent to log (its held lines: kpr.sources.files._HeldLog)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.records: list[tuple[Any, ...]] = []

    def _ship(self, level: int, msg: str, args: tuple[Any, ...], exc_text: str | None) -> None:
        fn, lno, func, _ = self.logger.findCaller(stacklevel=3)
        # Arguments as text: the agent formats them as it would its own (%s, %d of ints).
        safe = tuple(a if type(a) in (int, float, str, bool) else str(a) for a in args)
        self.records.append((level, msg, safe, exc_text, fn, lno, func, time.time()))

    def info(self, msg: str, *args: Any) -> None:
        self._ship(logging.INFO, msg, args, None)

    def warning(self, msg: str, *args: Any) -> None:
        self._ship(logging.WARNING, msg, args, None)

    def exception(self, msg: str, *args: Any) -> None:
        self._ship(logging.ERROR, msg, args, traceback.format_exc().rstrip("\n"))

    def take(self) -> list[tuple[Any, ...]]:
        records, self.records = self.records, []
        return records


def _by_constructor(cls: type) -> Any:
    """A reducer that makes a slotted dataclass again by calling it with its fields in order
    (a third less time to read back than pickle's default, whose __setstate__ loops over the
    fields in Python); None for a class where that would not give the same object."""
    import dataclasses

    if not dataclasses.is_dataclass(cls) or "__slots__" not in vars(cls) or hasattr(cls, "__post_init__"):
        return None
    fields = dataclasses.fields(cls)
    if not all(f.init and not f.kw_only for f in fields):
        return None
    names = tuple(f.name for f in fields)
    return lambda obj: (cls, tuple([getattr(obj, n) for n in names]))


def dispatch_table(tr: Any, cluster_cidrs: tuple[str, ...]) -> dict[type, Any]:
    """How what the worker sends is pickled: the validation readings' classes (kpr.translate's
    and kpr.model's slotted dataclasses) by their constructors, and AddressRules as the
    agent's own instance (translate.address_rules of the same networks, cached there: the
    store compares rules by identity)."""
    from .. import model

    table = copyreg.dispatch_table.copy()
    for module in (tr, model):
        for value in vars(module).values():
            if isinstance(value, type) and value.__module__ == module.__name__:
                reducer = _by_constructor(value)
                if reducer is not None:
                    table[value] = reducer
    table[tr.AddressRules] = lambda rules: (tr.address_rules, (cluster_cidrs,))
    return table


def serve(out_fd: int, job: dict[str, Any], stop: Any) -> None:
    from pathlib import Path

    from .. import memory, model
    from .. import translate as tr
    from .files import FilesSource

    # The agent's places first, so a new pair gets the id the agent gives it too.
    for node_name, zone in job["places"][1:]:
        model.place_id(node_name, zone)
    cluster_cidrs = tuple(job["cluster_cidrs"])
    src = FilesSource(Path(job["path"]), _Cidrs(cluster_cidrs), max_file_size=job["max_file_size"])  # type: ignore[arg-type]
    shipped = _ShippedLog(logging.getLogger("kpr.sources.files"))
    src._log = shipped
    out = os.fdopen(out_fd, "wb", buffering=1 << 20)
    known_places = len(model.places)

    table = dispatch_table(tr, cluster_cidrs)

    def send(message: tuple[Any, ...]) -> None:
        buf = io.BytesIO()
        buf.write(HEADER.pack(0))
        pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = table
        pickler.dump(message)
        data = buf.getbuffer()
        data[: HEADER.size] = HEADER.pack(len(data) - HEADER.size)
        out.write(data)

    with memory.paused():
        for name, sig in job["files"]:
            if stop():
                break  # the agent read the rest itself
            st = src._load_file(tr, name, tuple(sig), None)
            result = None
            if st is not None:
                objects = [(ref, packed, tr.take_checked(packed)) for ref, packed in st.objects.items()]
                result = (st.sig, st.errors, st.failed, sorted(st.service_keys), objects)
            new_places = model.places[known_places:]
            known_places = len(model.places)
            send(("file", name, result, new_places, shipped.take()))
            out.flush()  # file by file: the agent unpacks one while the next is read
    usage = resource.getrusage(resource.RUSAGE_SELF)
    send(("done", usage.ru_utime + usage.ru_stime, peak_rss_kb()))
    out.close()


# --- the agent's side ------------------------------------------------------------------


class WorkerFailed(Exception):
    """The worker could not be started, ended early, went silent or sent what is not a message."""


# The longest the agent waits for the worker's next message: a file takes well under a
# second (10 MB of YAML, source.maxFileSize's default, about 3 s on a busy VM).
MESSAGE_TIMEOUT = 30.0


# The longest the agent waits for the worker to take its job: it reads it right after its
# imports (a fraction of a second; seconds on a busy VM).
JOB_TIMEOUT = 10.0


# /proc/sys/fs/pipe-max-size's default: what an unprivileged process may ask for.
PIPE_SIZE = 1024 * 1024


def command() -> list[str]:
    return python_module("kpr.sources.files_worker")


def _large_pipe(fd: int) -> None:
    """The pipe of `fd` made PIPE_SIZE large, when the kernel lets this process; else as large
    as /proc/sys/fs/pipe-max-size lets an unprivileged process (EPERM past it: a smaller
    pipe is more writes, the same bytes)."""
    try:
        import fcntl

        set_size = fcntl.F_SETPIPE_SZ
    except (ImportError, AttributeError):
        return
    try:
        fcntl.fcntl(fd, set_size, PIPE_SIZE)
        return
    except OSError:
        pass
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            most = int(f.read())
        if most < PIPE_SIZE:
            fcntl.fcntl(fd, set_size, most)
    except (OSError, ValueError):
        pass


class Worker:
    """A running worker (spawned: a fork of the threaded agent could inherit a lock held by
    another thread) and its messages, read as they come."""

    def __init__(self, job: dict[str, Any], cmd: list[str] | None = None) -> None:
        import subprocess
        import tempfile

        # Its stderr (a traceback, should it crash) to a file: in the agent's log it could land
        # while a BPF compile captures fd 2, and a pipe nobody reads could block it. Made
        # before the pipe, so that no temp dir (or no fd left) leaks nothing and fails as the
        # worker failing: the caller reads in the agent.
        try:
            self.stderr = tempfile.TemporaryFile()
        except OSError as e:
            raise WorkerFailed(f"not started: {e}") from None
        try:
            r, w = os.pipe()
        except OSError as e:
            self.stderr.close()
            raise WorkerFailed(f"not started: {e}") from None
        # A file's message is about 70 KB at 100 services: in a 64 KB pipe the worker waits
        # for this side (busy reading files itself) to drain each; 1 MB holds a dozen.
        _large_pipe(r)
        try:
            self.proc = subprocess.Popen(
                [*(cmd or command()), str(w)], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                stderr=self.stderr, pass_fds=(w,), close_fds=True,
            )
        except BaseException as e:
            os.close(r)
            self.stderr.close()
            raise WorkerFailed(f"not started: {e}") from None
        finally:
            os.close(w)
        self.fd = r
        # The job (a name and signature per file: 64 KB at a few thousand files) in one write,
        # the worker still importing, rather than a write per 64 KB it takes.
        assert self.proc.stdin is not None
        _large_pipe(self.proc.stdin.fileno())
        import select

        self._poll = select.poll()
        self._poll.register(r, select.POLLIN)
        self._buf = bytearray()
        self._eof = False
        try:
            body = pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL)
            self._send_job(HEADER.pack(len(body)) + body)  # stdin kept open: closing it asks the worker to stop
        except OSError as e:
            self.close()
            raise WorkerFailed(f"not started: {e}") from None
        except WorkerFailed:
            self.close()
            raise

    def _send_job(self, data: bytes) -> None:
        """`data` on the worker's stdin within JOB_TIMEOUT: the pipe holds PIPE_SIZE (64 KB
        when the kernel refuses more) and a job (a name and signature per file) can be larger,
        so a worker that never reads (stuck before its job) would hold a blocking write, and
        the agent, for good."""
        import select
        import time

        assert self.proc.stdin is not None
        fd = self.proc.stdin.fileno()
        os.set_blocking(fd, False)
        writable = select.poll()
        writable.register(fd, select.POLLOUT)
        view = memoryview(data)
        deadline = time.monotonic() + JOB_TIMEOUT
        while view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"did not take its job in {JOB_TIMEOUT:g}s ({len(data) - len(view)} of {len(data)} bytes)")
            if writable.poll(left * 1000):
                try:
                    view = view[os.write(fd, view):]  # (a worker gone: EPIPE, an OSError)
                except BlockingIOError:
                    pass
        os.set_blocking(fd, True)

    def ask_to_stop(self) -> None:
        """The worker sends what it is reading, then "done"."""
        stdin = self.proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass  # it ended already: next() says how

    def _read(self, timeout: float) -> None:
        # poll, not select: the agent's fds may number past select's 1024 (LimitNOFILE is
        # high and the plugins hold BPF fds while the first pass runs).
        if self._poll.poll(timeout * 1000):
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self._eof = True
            self._buf += chunk

    def _complete(self) -> bool:
        buf = self._buf
        return len(buf) >= HEADER.size and len(buf) >= HEADER.size + HEADER.unpack_from(buf)[0]

    def ready(self) -> bool:
        """Whether a message (or the worker's end) can be read without waiting."""
        while not self._complete() and not self._eof:
            before = len(self._buf)
            self._read(0)
            if len(self._buf) == before and not self._eof:
                return False
        return True

    def next(self, stopped: Any) -> tuple[Any, ...]:
        """The next message, waiting up to MESSAGE_TIMEOUT; raises WorkerFailed."""
        import time

        deadline = time.monotonic() + MESSAGE_TIMEOUT
        while not self._complete():
            if self._eof:
                raise WorkerFailed(f"ended early{self._exit_text()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerFailed(f"silent for {MESSAGE_TIMEOUT:g}s")
            if stopped():
                raise WorkerFailed("source stopped")
            self._read(min(left, 0.2))
        (size,) = HEADER.unpack_from(self._buf)
        body = bytes(memoryview(self._buf)[HEADER.size : HEADER.size + size])
        del self._buf[: HEADER.size + size]
        try:
            message = pickle.loads(body)
        except Exception as e:
            raise WorkerFailed(f"bad output ({type(e).__name__}: {e})") from None
        if type(message) is not tuple or not message or message[0] not in ("file", "done"):
            raise WorkerFailed("bad output (not a message)")
        return message

    def _exit_text(self) -> str:
        try:
            code = self.proc.wait(2)
        except Exception:
            return ""
        self.stderr.seek(0)
        last = self.stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
        return f" (exit code {code}{': ' + last[-1] if last else ''})"

    def close(self, grace: float = 0.0) -> None:
        """Ends the worker (after `grace` seconds to exit on its own) and reaps it: its CPU
        then counts as the agent's, in /proc/<agent>/stat's cutime and cstime."""
        import subprocess

        self.ask_to_stop()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.fd)
        self.stderr.close()


def _read_job(fd: int) -> dict[str, Any] | None:
    """The job on `fd` (a length, then a pickle), read unbuffered: what follows it on fd, the
    agent closing it, asks the worker to stop. None when it was closed before."""
    data = b""
    while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return None
        data += chunk
    return pickle.loads(data[HEADER.size :])


def _asked_to_stop(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def main(argv: list[str]) -> int:
    job = _read_job(0)
    if job is not None:
        serve(int(argv[1]), job, lambda: _asked_to_stop(0))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
