"""A BPF compile in a process of its own, into the program cache (kpr.bpf.progcache).

`python -m kpr.bpf.compile_child` reads one JSON request on stdin (the prepared source: text,
flags and label; the programs; the cache's directory, pin path and the entry's key), compiles
the source with bcc, as the agent would (the pinned maps bcc declares are opened or made and
pinned under bpf.pinPath), and writes the entry that a cache load then serves. It loads no
program: the agent's load from the entry runs the verifier, and anything wrong there is a
miss the agent answers with a compile of its own, whose errors it reports as before.

Why a process: bcc's clang and LLVM stay out of the agent. Compiled in the agent they left
about 90 MB of RSS behind them (a first start's steady RSS at 20k services 235 MB, a restart's
143 MB), and the compile shared the agent's heap and address space with the files source's
first pass running beside it. Exit status 0 and the entry's path on stdout when it is written;
anything else (the compile's messages on stderr) means no entry.
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
        return 0  # started ahead and not needed (the agent closed its end)
    req = json.loads(raw)

    source = Source(req["text"], tuple(req["flags"]), req["label"])
    programs = [tuple(p) for p in req["programs"]]
    bpf = compile_and_load(source)
    try:
        path = ProgramCache(req["directory"], req["pin_path"]).store(req["key"], bpf, programs)
    finally:
        bpf.cleanup()
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
