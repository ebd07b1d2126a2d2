"""Inline kpr's own C headers into a program's text before bcc compiles it.

bcc rewrites map operations (`kpr_svc.lookup(&k)`) only in the main file: the rewritten
copies of included headers are thrown away, so a map call inside an included header
reaches LLVM as an indirect call and the verifier rejects it ("unknown opcode 8d"). The
shared library (lib/*.h) is all map calls, so its headers are pasted into the main text,
each once, with #line markers so compiler errors still name the header and line.

Only quoted includes found under the search path are inlined; <system> includes and
quoted ones that are not found are left for the compiler.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

BPF_DIR = Path(__file__).resolve().parent

_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')

__all__ = ["inline_includes"]


def _find(name: str, dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        cand = d / name
        if cand.is_file():
            return cand.resolve()
    return None


def inline_includes(text: str, include_dirs: Sequence[Path] = (), *, label: str = "main.c") -> str:
    """Return `text` with its quoted includes (searched in include_dirs, then core/bpf) inlined."""
    dirs = [Path(d) for d in include_dirs] + [BPF_DIR]
    seen: set[Path] = set()
    out: list[str] = []

    def expand(src: str, name: str, here: Path | None) -> None:
        search = ([here] if here is not None else []) + dirs
        for lineno, line in enumerate(src.splitlines(), 1):
            m = _INCLUDE_RE.match(line)
            path = _find(m.group(1), search) if m else None
            if path is None:
                out.append(line)
                continue
            if path not in seen:
                seen.add(path)
                out.append(f'#line 1 "{path}"')
                expand(path.read_text(), str(path), path.parent)
            # back in the including file, on the line after the #include
            out.append(f'#line {lineno + 1} "{name}"')

    expand(text, label, None)
    log.debug("event=bpf_includes_inlined headers=%d", len(seen))
    return "\n".join(out) + "\n"
