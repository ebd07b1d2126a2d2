"""A BPF compile in a process of its own, for the program cache (kpr.bpf.progcache).

`python -P -m kpr.bpf.compile_child` reads one JSON request on stdin (the prepared source:
text, flags and label; the programs; the pin path and the entry's key), compiles the source
with bcc, as the agent would (the pinned maps bcc declares are opened or made and pinned
under bpf.pinPath), and writes the cache entry's bytes to stdout. It loads no program and
writes no file but, for a build the cache cannot record, the pins of the maps an entry cannot
record, handed to the agent (kpr.bpf.progcache.HANDED_PREFIX: it loads them once, removes the
pins and stores nothing). The agent loads the entry from memory (the verifier runs there, and anything
wrong is a miss the agent answers with a compile of its own, whose errors it reports as
before), then stores it in the cache when it can.

Why a process: bcc's clang and LLVM stay out of the agent. Compiled in the agent they left
about 90 MB of RSS behind them (a first start's steady RSS at 20k services 235 MB, a restart's
143 MB), and the compile shared the agent's heap and address space with the files source's
first pass running beside it. Exit status 0 with the entry on stdout; anything else (the
compile's messages on stderr) means no entry. Crashes of earlier compiles are the agent's to
report (it logs them before it hands the child its request): this process's stderr is
dropped on success.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    # Imported before the request is read: a child started ahead of the compile
    # (kpr.bpf.progcache.CompileChild) has its interpreter, kpr and libbcc loaded by then.
    from kpr.bpf.loader import Source, compile_and_load, import_bcc
    from kpr.bpf.progcache import ProgramCache

    import_bcc()
    raw = sys.stdin.buffer.read()
    if not raw:
        return 0  # started ahead and not needed (the agent closed its end, or ended)
    req = json.loads(raw)

    source = Source(req["text"], tuple(req["flags"]), req["label"])
    programs = [tuple(p) for p in req["programs"]]
    bpf = compile_and_load(source, report_crashes=False)
    try:
        # (the directory is the agent's to write: only the pin path is used here)
        data = ProgramCache(".", req["pin_path"]).entry(req["key"], bpf, programs, hand_over=True)
    finally:
        bpf.cleanup()
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
