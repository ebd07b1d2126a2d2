"""What `perf script` says of `perf record -g` samples, counted where the kernel ran a test
program: the samples under BPF_PROG_TEST_RUN (a frame `bpf_test_run`), by the symbol they were
taken in (a BPF program's JIT image `bpf_prog_<tag>_<name>`, or a helper or kernel function it
called), and for a program by the offset in its image. This is how a benchmark sees which
instruction of which program a path's time goes to (benchmarks/profile_nodeport.py: a held slot
line's load, a map helper), where the stop builds only say between which stages it goes.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

UNDER = "bpf_test_run"  # the frame that marks a sample taken while a test run's program ran
_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(?P<sym>[^\s(]+?)(?:\+0x(?P<off>[0-9a-f]+))?(?:\s+\(.*\))?\s*$")
_PROG = re.compile(r"^bpf_prog_(?P<tag>[0-9a-f]{16})_(?P<name>\w+)$")


@dataclass
class Profile:
    samples: int = 0  # every sample read
    in_run: int = 0  # samples with a frame `under`
    leaves: collections.Counter[str] = field(default_factory=collections.Counter)  # leaf symbol -> samples
    offsets: dict[str, collections.Counter[int]] = field(default_factory=dict)  # program symbol -> offset -> samples

    def share(self, symbol: str) -> float:
        """The leaf symbol's share of the samples taken in a run."""
        return self.leaves[symbol] / self.in_run if self.in_run else 0.0

    def hottest(self, symbol: str, n: int) -> list[tuple[int, float]]:
        """A program's n hottest offsets, each with its share of the program's own samples."""
        c = self.offsets.get(symbol, collections.Counter())
        total = sum(c.values())
        return [(off, k / total) for off, k in c.most_common(n)]


def program_name(symbol: str) -> str | None:
    """The program's name in a JIT image's symbol (bpf_prog_<tag>_<name>), else None."""
    m = _PROG.match(symbol)
    return m.group("name") if m else None


def program_tag(symbol: str) -> str | None:
    """The program's tag (bpf_prog_info.tag in hex) in a JIT image's symbol, else None: what
    names a loaded program whole (the kernel keeps 15 characters of a name)."""
    m = _PROG.match(symbol)
    return m.group("tag") if m else None


def _frames(block: list[str]) -> list[tuple[str, int | None]]:
    out = []
    for line in block:
        m = _FRAME.match(line)
        if m:
            out.append((m.group("sym"), int(m.group("off"), 16) if m.group("off") else None))
    return out


def parse(lines: Iterable[str], under: str = UNDER) -> Profile:
    """Samples of `perf script` output (a header line, its frames indented, leaf first, a blank
    line after each): counted by their leaf frame when a frame is `under`."""
    p = Profile()
    block: list[str] = []

    def close() -> None:
        if not block:
            return
        p.samples += 1
        frames = _frames(block[1:])
        if frames and any(sym == under for sym, _ in frames):
            p.in_run += 1
            sym, off = frames[0]
            p.leaves[sym] += 1
            if off is not None and program_name(sym):
                p.offsets.setdefault(sym, collections.Counter())[off] += 1
        block.clear()

    for line in lines:
        if not line.strip():
            close()
        elif not line[0].isspace():
            close()  # (a header right after the last frame: no blank line between)
            block.append(line)
        elif block:
            block.append(line)
    close()
    return p
