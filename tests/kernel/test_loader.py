"""Loader, headers, probes and mount helpers of kpr.bpf."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from kpr.bpf import fs, loader, probes
from kpr.bpf.headers import HeadersMissing, ensure_kernel_headers, find_distribution_tree
from kpr.bpf.loader import BPF_DIR, BPFError, CompileError, VerifierError, compile_and_load, load_prog

GOOD_XDP = "int good(struct xdp_md *ctx) { return XDP_PASS; }\n"

# Reads the packet without a bounds check: the verifier must refuse it.
UNCHECKED_XDP = textwrap.dedent(
    """
    int unchecked(struct xdp_md *ctx) {
        unsigned char *data = (void *)(long)ctx->data;
        return data[20];
    }
    """
)


# ---------------------------------------------------------------- headers (no root needed)


def _fake_tree(src: Path, version: str, flavour: str, *, common: bool = True) -> Path:
    tree = src / f"linux-headers-{version}-{flavour}"
    (tree / "include" / "generated").mkdir(parents=True)
    (tree / "include" / "generated" / "autoconf.h").write_text("/* fake */\n")
    if common:
        c = src / f"linux-headers-{version}-common"
        (c / "include" / "linux").mkdir(parents=True, exist_ok=True)
        (c / "include" / "linux" / "kconfig.h").write_text("/* fake */\n")
        (tree / "Makefile").write_text(f"include {c}/Makefile\n")
    return tree


def test_missing_headers_name_the_package(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    modules.mkdir()
    src.mkdir()
    with pytest.raises(HeadersMissing) as err:
        ensure_kernel_headers(modules_dir=modules, src_dir=src, release="9.9.9-kpr-test", arch="amd64")
    assert err.value.package == "linux-headers-amd64"
    assert "linux-headers-amd64" in str(err.value)
    assert "9.9.9-kpr-test" in str(err.value)
    assert not (modules / "9.9.9-kpr-test").exists(), "nothing should be created when nothing was found"


def test_missing_headers_package_follows_arch(tmp_path: Path) -> None:
    with pytest.raises(HeadersMissing) as err:
        ensure_kernel_headers(modules_dir=tmp_path, src_dir=tmp_path, release="9.9.9", arch="arm64")
    assert err.value.package == "linux-headers-arm64"


def test_split_tree_is_linked_as_build_and_source(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    modules.mkdir()
    src.mkdir()
    _fake_tree(src, "6.1.0-10", "amd64")
    newest = _fake_tree(src, "6.1.0-56", "amd64")
    _fake_tree(src, "6.1.0-60", "cloud-amd64")  # newer, but the plain flavour is preferred
    _fake_tree(src, "6.1.0-70", "arm64")  # other architecture
    (src / "linux-headers-6.1.0-80-amd64").mkdir()  # incomplete tree

    tree = ensure_kernel_headers(modules_dir=modules, src_dir=src, release="6.18.0-test", arch="amd64")

    assert tree.build == newest
    assert tree.source == src / "linux-headers-6.1.0-56-common"
    build, source = modules / "6.18.0-test" / "build", modules / "6.18.0-test" / "source"
    assert build.is_symlink() and Path(os.readlink(build)) == newest
    assert source.is_symlink() and Path(os.readlink(source)) == tree.source
    # Second call finds the links and keeps them.
    again = ensure_kernel_headers(modules_dir=modules, src_dir=src, release="6.18.0-test", arch="amd64")
    assert again.build == newest


def test_dangling_link_is_replaced_but_a_real_directory_is_not(tmp_path: Path) -> None:
    modules, src = tmp_path / "modules", tmp_path / "src"
    src.mkdir()
    tree = _fake_tree(src, "6.1.0-56", "amd64")
    rel = modules / "6.18.0-a"
    rel.mkdir(parents=True)
    (rel / "build").symlink_to(tmp_path / "gone")
    assert ensure_kernel_headers(modules_dir=modules, src_dir=src, release="6.18.0-a", arch="amd64").build == tree

    rel_b = modules / "6.18.0-b"
    (rel_b / "build").mkdir(parents=True)  # someone's own (broken) tree
    with pytest.raises(HeadersMissing, match="refusing"):
        ensure_kernel_headers(modules_dir=modules, src_dir=src, release="6.18.0-b", arch="amd64")


def test_find_distribution_tree_none(tmp_path: Path) -> None:
    assert find_distribution_tree(tmp_path / "absent", "amd64") is None


# ---------------------------------------------------------------- compile and load


@pytest.mark.kernel
def test_compile_error_carries_message_and_file(kernel_headers: Path) -> None:
    src = "int f(struct xdp_md *ctx) { return XDP_PASS + not_declared_anywhere; }\n"
    with pytest.raises(CompileError) as err:
        compile_and_load(src, name="broken_prog.c")
    e = err.value
    assert e.file == "broken_prog.c"
    assert "not_declared_anywhere" in e.message
    assert "error" in e.message
    assert "broken_prog.c:1:" in e.message, "clang's location should name our file, not /virtual/main.c"


@pytest.mark.kernel
def test_compile_error_in_a_file_names_the_file(kernel_headers: Path, tmp_path: Path) -> None:
    path = tmp_path / "bad.c"
    path.write_text("int f(struct xdp_md *ctx) {\n  return XDP_PASS\n}\n")  # missing semicolon
    with pytest.raises(CompileError) as err:
        compile_and_load(path)
    assert err.value.file == str(path)
    assert f"{path}:2:" in err.value.message or f"{path}:3:" in err.value.message
    assert "expected ';'" in err.value.message


@pytest.mark.kernel
def test_includes_from_file_dir_and_include_dirs(kernel_headers: Path, tmp_path: Path) -> None:
    (tmp_path / "local.h").write_text("#define LOCAL_VERDICT XDP_PASS\n")
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "extra.h").write_text("#define EXTRA_VERDICT XDP_DROP\n")
    prog = tmp_path / "prog.c"
    prog.write_text(
        '#include "local.h"\n#include "extra.h"\n'
        "int a(struct xdp_md *ctx) { return LOCAL_VERDICT; }\n"
        "int b(struct xdp_md *ctx) { return EXTRA_VERDICT; }\n"
    )
    with compile_and_load(prog, include_dirs=[extra], cflags=["-DUNUSED=1"]) as bpf:
        assert load_prog(bpf, "a", "XDP").fd >= 0
        assert load_prog(bpf, "b", "XDP").fd >= 0


@pytest.mark.kernel
def test_kpr_bpf_dir_is_on_the_include_path(
    kernel_headers: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Programs include "lib/x.h" and "ctx/skb.h" relative to kpr's bpf directory; point
    # that directory at a scratch tree so the test does not depend on the real headers.
    assert BPF_DIR.name == "bpf" and (BPF_DIR / "loader.py").is_file()
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "kpr_test_only.h").write_text("#define FROM_LIB XDP_TX\n")
    monkeypatch.setattr(loader, "BPF_DIR", tmp_path)
    src = '#include "lib/kpr_test_only.h"\nint from_lib(struct xdp_md *ctx) { return FROM_LIB; }\n'
    with compile_and_load(src) as bpf:
        assert load_prog(bpf, "from_lib", "XDP").fd >= 0


@pytest.mark.kernel
def test_verifier_rejection_gives_log_tail(kernel_headers: Path) -> None:
    bpf = compile_and_load(UNCHECKED_XDP, name="unchecked.c")
    try:
        with pytest.raises(VerifierError) as err:
            load_prog(bpf, "unchecked", "XDP")
    finally:
        bpf.cleanup()
    e = err.value
    assert e.prog == "unchecked"
    assert e.file == "unchecked.c"
    assert "invalid access to packet" in e.log_tail
    assert len(e.log_tail.splitlines()) <= 30
    assert "invalid access to packet" in str(e)


def test_verifier_error_keeps_only_the_tail() -> None:
    log_text = "\n".join(f"{i}: insn" for i in range(200)) + "\nR1 offset is outside of the packet\n"
    e = VerifierError("p", "p.c", "Permission denied", log_text)
    lines = e.log_tail.splitlines()
    assert len(lines) == 30
    assert lines[-1] == "R1 offset is outside of the packet"
    assert e.log == log_text


@pytest.mark.kernel
def test_load_prog_unknown_function(kernel_headers: Path) -> None:
    with compile_and_load(GOOD_XDP) as bpf:
        with pytest.raises(BPFError, match="no function 'nope'"):
            load_prog(bpf, "nope", "XDP")
        with pytest.raises(ValueError, match="unknown BPF program type"):
            load_prog(bpf, "good", "NOT_A_TYPE")


@pytest.mark.kernel
def test_load_cgroup_sock_addr_with_attach_type(kernel_headers: Path) -> None:
    src = "int c4(struct bpf_sock_addr *ctx) { return 1; }\n"
    with compile_and_load(src) as bpf:
        fn = load_prog(bpf, "c4", "CGROUP_SOCK_ADDR", attach_type="CGROUP_INET4_CONNECT")
        assert fn.fd >= 0


# ---------------------------------------------------------------- probes


@pytest.mark.kernel
def test_probes(kernel_headers: Path) -> None:
    assert probes.have_prog_type("XDP")
    assert probes.have_prog_type("SCHED_CLS")
    assert probes.have_prog_type("CGROUP_SOCK_ADDR")
    assert probes.have_helper("bpf_redirect_peer")
    assert probes.have_helper("redirect_neigh")
    assert probes.have_helper("get_netns_cookie")
    # A helper the program type may not call, and one no kernel has.
    assert not probes.have_helper("redirect_peer", "XDP")
    assert not probes.have_helper("kpr_no_such_helper")


@pytest.mark.kernel
def test_probe_all_summary(kernel_headers: Path) -> None:
    summary = probes.probe_all()
    assert summary["root"] is True
    assert summary["bcc"]
    assert summary["headers"]
    assert summary["prog_types"]["xdp"] is True
    assert set(probes.HELPER_PROG_TYPES) <= set(summary["helpers"])
    assert summary["cgroup2"] == (str(p) if (p := probes.cgroup2_mount()) else None)
    assert summary["errors"] == []


# ---------------------------------------------------------------- mounts


def test_mount_lookup_reuses_an_existing_mount(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "sysfs /sys sysfs rw 0 0\nbpf /srv/my\\040bpf bpf rw,relatime 0 0\nnone /srv/cg2 cgroup2 rw 0 0\n"
    )
    assert fs.find_mounts("bpf", mounts) == [Path("/srv/my bpf")]
    # Nothing is mounted when one exists: the existing mount point comes back.
    assert fs.ensure_bpffs(tmp_path / "wanted", mounts_file=mounts) == Path("/srv/my bpf")
    assert fs.ensure_cgroup2(tmp_path / "wanted", mounts_file=mounts) == Path("/srv/cg2")
    assert not (tmp_path / "wanted").exists()


_MOUNT_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from kpr.bpf import fs
    base = Path(sys.argv[1])
    b = fs.ensure_bpffs(base / "bpf", reuse_existing=False)
    c = fs.ensure_cgroup2(base / "cg2", reuse_existing=False)
    assert b in fs.find_mounts("bpf"), fs.find_mounts("bpf")
    assert c in fs.find_mounts("cgroup2"), fs.find_mounts("cgroup2")
    assert (c / "cgroup.procs").exists()
    # Asking again is a no-op.
    assert fs.ensure_bpffs(b, reuse_existing=False) == b
    print("mounted", b, c)
    """
)


@pytest.mark.kernel
def test_ensure_mounts_in_a_private_mount_namespace(tmp_path: Path) -> None:
    # A private mount namespace: the mounts vanish with the process, the host never sees them.
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _MOUNT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert "mounted" in res.stdout
    host_mounts = Path("/proc/self/mounts").read_text()
    assert str(tmp_path) not in host_mounts


# ---------------------------------------------------------------- scripts/install-deps.sh

INSTALL_DEPS = Path(__file__).resolve().parents[2] / "scripts" / "install-deps.sh"


def _install_deps(tmp_path: Path, release: str) -> subprocess.CompletedProcess[str]:
    if os.geteuid() != 0:
        pytest.skip("install-deps.sh only acts as root")
    env = dict(
        os.environ,
        KPR_SKIP_APT="1",
        KPR_MODULES_DIR=str(tmp_path / "modules"),
        KPR_SRC_DIR=str(tmp_path / "src"),
        KPR_KERNEL_RELEASE=release,
    )
    return subprocess.run(["sh", str(INSTALL_DEPS)], capture_output=True, text=True, env=env, timeout=60)


def test_install_deps_links_the_same_tree_as_python(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip() or "amd64"
    _fake_tree(src, "6.1.0-10", arch)
    newest = _fake_tree(src, "6.1.0-56", arch)
    _fake_tree(src, "6.1.0-60", f"cloud-{arch}")
    res = _install_deps(tmp_path, "6.18.0-sh")
    assert res.returncode == 0, res.stderr
    rel = tmp_path / "modules" / "6.18.0-sh"
    assert Path(os.readlink(rel / "build")) == newest
    assert Path(os.readlink(rel / "source")) == src / "linux-headers-6.1.0-56-common"
    py = ensure_kernel_headers(modules_dir=tmp_path / "m2", src_dir=src, release="x", arch=arch)
    assert py.build == newest
    # Second run: already valid, nothing to do.
    assert _install_deps(tmp_path, "6.18.0-sh").returncode == 0


def test_install_deps_names_the_package_when_no_tree(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    res = _install_deps(tmp_path, "6.18.0-none")
    assert res.returncode == 1
    assert "apt-get install linux-headers-" in res.stderr


STACK_HOG = r"""
int hog(struct __sk_buff *skb)
{
	volatile char big[1024];
	big[skb->len & 1023] = 1;
	return big[skb->protocol & 1023];
}
"""


@pytest.mark.kernel
def test_a_compile_that_ends_the_process_is_reported_by_the_next(require_kernel, kernel_headers, tmp_path):
    from kpr.bpf import loader

    script = tmp_path / "crash.py"
    script.write_text(
        "import sys\nfrom kpr.bpf import loader\n"
        f"loader.CRASH_DIR = __import__('pathlib').Path({str(tmp_path)!r})\n"
        f"loader.compile_and_load({STACK_HOG!r}, name='hog.c')\n"
        "print('survived')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    if "survived" in proc.stdout:
        pytest.skip("this LLVM reports the oversized stack as an error instead of ending the process")
    assert proc.returncode != 0
    left = list(tmp_path.glob("kpr-bpf-compile-*.log"))
    assert len(left) == 1, "the crashed compile's output stays on disk"
    old = loader.CRASH_DIR
    loader.CRASH_DIR = tmp_path
    try:
        reports = loader.report_crashed_compiles()
    finally:
        loader.CRASH_DIR = old
    assert len(reports) == 1 and "stack" in reports[0].lower(), reports
    assert not list(tmp_path.glob("kpr-bpf-compile-*.log")), "a report is given once"


# How a compile can end by a Python exception (not a crash): the raise inside bcc's call.
_RAISES = {
    "KeyboardInterrupt": "raise KeyboardInterrupt",
    "SystemExit": "raise SystemExit(3)",
    # a SIGTERM handler that unwinds (as kpr.testing.nodeport_bench.exit_on_sigterm's)
    "SIGTERM": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30)",
    "RuntimeError": "raise RuntimeError('bcc broke')",
}


@pytest.mark.kernel
@pytest.mark.parametrize("how", sorted(_RAISES))
def test_a_compile_ended_by_an_exception_is_no_crash(require_kernel, kernel_headers, tmp_path, how):
    """The capture file goes with the exception; only a process that died keeps it (above)."""
    from kpr.bpf import loader

    script = tmp_path / "raise.py"
    script.write_text(
        "import os, signal, sys, time\nimport bcc\nfrom kpr.bpf import loader\n"
        f"loader.CRASH_DIR = __import__('pathlib').Path({str(tmp_path)!r})\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
        "def compile_raises(*a, **k):\n"
        "    os.write(2, b'clang said something\\n')\n"
        f"    {_RAISES[how]}\n"
        "bcc.BPF = compile_raises\n"
        "try:\n"
        "    loader.compile_and_load('int x;', name='x.c')\n"
        "finally:\n"
        "    print('left', sorted(p.name for p in loader.CRASH_DIR.glob('kpr-bpf-compile-*.log')))\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "left []" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert not list(tmp_path.glob("kpr-bpf-compile-*.log"))
    old = loader.CRASH_DIR
    loader.CRASH_DIR = tmp_path
    try:
        assert loader.report_crashed_compiles() == []
    finally:
        loader.CRASH_DIR = old
