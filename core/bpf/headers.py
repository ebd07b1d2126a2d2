"""Kernel headers for bcc.

bcc compiles BPF C against /lib/modules/$(uname -r)/build (and .../source when the
distribution splits its headers). Kernels without shipped headers (a VM kernel such as
6.18 here) have neither, so we present an installed distribution headers tree at those
paths. BCC_KERNEL_SOURCE alone is not enough for Debian's split trees: kconfig.h lives
in the -common sibling, which bcc only finds through the `source` link.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MODULES_DIR = Path("/lib/modules")
SRC_DIR = Path("/usr/src")

# Debian's names for `uname -m`, used when dpkg is not there to ask.
_MACHINE_TO_DEB_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "armhf",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "i386",
}

_HEADERS_DIR_RE = re.compile(r"^linux-headers-(?P<version>\d+\.\d+(?:\.\d+)?(?:-\d+)?)-(?P<flavour>.+)$")


class HeadersMissing(RuntimeError):
    """No usable kernel headers tree; the message says which package to install."""

    def __init__(self, message: str, package: str) -> None:
        super().__init__(message)
        self.package = package


@dataclass(frozen=True)
class HeadersTree:
    build: Path
    source: Path  # same as build for non-split trees


def kernel_release() -> str:
    return os.uname().release


def deb_arch() -> str:
    """Debian architecture name of this machine (amd64, arm64, ...)."""
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out:
                return out
        except (subprocess.SubprocessError, OSError) as exc:
            log.debug("event=dpkg_arch_failed error=%r", exc)
    machine = platform.machine()
    return _MACHINE_TO_DEB_ARCH.get(machine, machine)


def headers_package(arch: str | None = None) -> str:
    return f"linux-headers-{arch or deb_arch()}"


def install_hint(arch: str | None = None) -> str:
    pkg = headers_package(arch)
    if shutil.which("apt-get"):
        return f"apt-get install {pkg}"
    # Other distributions name it differently; still give the Debian name as the reference.
    return f"install your distribution's kernel headers package (on Debian: apt-get install {pkg})"


def is_valid_tree(build: Path, source: Path | None = None) -> bool:
    """A tree bcc can compile against: generated config in build, kconfig.h in build or source."""
    try:
        if not (build / "include" / "generated" / "autoconf.h").is_file():
            return False
        roots = [build] + ([source] if source is not None else [])
        return any((r / "include" / "linux" / "kconfig.h").is_file() for r in roots)
    except OSError:
        return False


def _release_tree(modules_dir: Path, release: str) -> HeadersTree | None:
    rel = modules_dir / release
    build, source = rel / "build", rel / "source"
    src = source if source.exists() else None
    if is_valid_tree(build, src):
        return HeadersTree(build=build.resolve(), source=(src or build).resolve())
    return None


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.split(r"[.-]", version) if p.isdigit())


def _common_sibling(tree: Path) -> Path | None:
    """The -common tree a Debian flavour tree builds against."""
    # The flavour Makefile names its common tree exactly; fall back to the naming rule.
    makefile = tree / "Makefile"
    try:
        for line in makefile.read_text(errors="replace").splitlines()[:20]:
            m = re.match(r"\s*include\s+(\S+)/Makefile\s*$", line)
            if m and Path(m.group(1)).is_dir():
                return Path(m.group(1))
    except OSError:
        pass
    m = _HEADERS_DIR_RE.match(tree.name)
    if m:
        cand = tree.parent / f"linux-headers-{m.group('version')}-common"
        if cand.is_dir():
            return cand
    return None


def find_distribution_tree(src_dir: Path = SRC_DIR, arch: str | None = None) -> HeadersTree | None:
    """Newest installed headers tree for this architecture, preferring the plain flavour."""
    arch = arch or deb_arch()
    candidates: list[tuple[tuple[int, ...], int, HeadersTree]] = []
    try:
        entries = sorted(src_dir.iterdir())
    except OSError:
        return None
    for d in entries:
        m = _HEADERS_DIR_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        flavour = m.group("flavour")
        if flavour != arch and not flavour.endswith(f"-{arch}"):
            continue
        common = _common_sibling(d)
        if not is_valid_tree(d, common):
            log.debug("event=headers_tree_incomplete tree=%s", d)
            continue
        plain = 1 if flavour == arch else 0
        candidates.append((_version_key(m.group("version")), plain, HeadersTree(d, common or d)))
    if not candidates:
        return None
    candidates.sort(key=lambda c: (c[1], c[0]))
    return candidates[-1][2]


def _atomic_symlink(target: Path, link: Path) -> None:
    # Concurrent callers (several test processes) may race here: replace atomically.
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex[:8]}")
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def ensure_kernel_headers(
    *,
    modules_dir: Path = MODULES_DIR,
    src_dir: Path = SRC_DIR,
    release: str | None = None,
    arch: str | None = None,
) -> HeadersTree:
    """Make sure bcc finds kernel headers for the running kernel; return the tree used.

    Roots are parameters so tests can point at empty directories instead of touching the
    machine's real links.
    """
    release = release or kernel_release()
    tree = _release_tree(modules_dir, release)
    if tree is not None:
        return tree

    arch = arch or deb_arch()
    found = find_distribution_tree(src_dir, arch)
    if found is None:
        hint = install_hint(arch)
        raise HeadersMissing(
            f"no kernel headers for {release}: {modules_dir / release / 'build'} is missing or incomplete "
            f"and no linux-headers-*-{arch} tree is installed under {src_dir}; {hint}",
            package=headers_package(arch),
        )

    rel_dir = modules_dir / release
    build, source = rel_dir / "build", rel_dir / "source"
    # A real directory there is someone's tree; only symlinks are ours to replace.
    for p in (build, source):
        if p.exists() and not p.is_symlink():
            raise HeadersMissing(
                f"{p} exists but is not a usable headers tree and is not a symlink; refusing to replace it; "
                f"fix or remove it, or {install_hint(arch)}",
                package=headers_package(arch),
            )
    rel_dir.mkdir(parents=True, exist_ok=True)
    _atomic_symlink(found.build, build)
    _atomic_symlink(found.source, source)
    log.info("event=kernel_headers_linked release=%s build=%s source=%s", release, found.build, found.source)
    return found
