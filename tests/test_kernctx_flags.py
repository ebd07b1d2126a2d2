"""kpr.bpf.kernctx without a usable kernel BTF: no flags (the programs infer the checksum state)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kpr.bpf import kernctx


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    kernctx.cflags.cache_clear()
    yield
    kernctx.cflags.cache_clear()


@pytest.mark.parametrize("content", [None, b"", b"\x9f\xeb" + bytes(30), b"not btf at all, long enough to parse"],
                         ids=["missing", "empty", "no types", "not BTF"])
def test_no_flags_without_a_usable_btf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None) -> None:
    path = tmp_path / "vmlinux"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setattr(kernctx, "VMLINUX", path)
    assert kernctx.cflags() == ()


def test_no_flags_with_the_jit_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    off = tmp_path / "bpf_jit_enable"
    off.write_text("0\n")
    monkeypatch.setattr(kernctx, "JIT_ENABLE", off)
    assert kernctx.cflags() == ()
