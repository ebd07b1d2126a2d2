"""Shared fixtures and markers. Tests marked `kernel` are skipped, with the reason, where
the machine cannot run them (not root, no bcc, ...): never passed silently."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from kpr.testing import kernel_skip_reason
from kpr.testing.cgroup import child_cgroup
from kpr.testing.netns import Topology


def pytest_sessionstart(session: pytest.Session) -> None:
    # A run killed before its teardown leaves namespaces and cgroups; remove those whose
    # creating process is dead (never those of runs still going on).
    if kernel_skip_reason() is None:
        from kpr.testing import cgroup as kt_cgroup
        from kpr.testing import netns as kt_netns

        kt_netns.sweep_stale()
        kt_cgroup.sweep_stale()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def require_kernel() -> None:
    """Skip unless root with bcc; for tests that are not marked `kernel`."""
    reason = kernel_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def kernel_headers(require_kernel: None) -> Path:
    """The headers tree bcc compiles against; skips with the install hint when there is none."""
    from kpr.bpf.headers import HeadersMissing, ensure_kernel_headers

    try:
        return ensure_kernel_headers().build
    except HeadersMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture
def topology(require_kernel: None) -> Iterator[Topology]:
    """A fresh namespace topology, torn down after the test."""
    with Topology() as topo:
        yield topo


@pytest.fixture
def cgroup(require_kernel: None) -> Iterator[Path]:
    """A fresh child cgroup under the cgroup2 root, removed after the test."""
    from kpr.bpf.probes import cgroup2_mount

    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    with child_cgroup() as path:
        yield path
