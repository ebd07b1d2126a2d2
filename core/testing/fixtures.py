"""pytest fixtures and hooks for kernel tests, kpr's own and a plugin's.

A plugin's test suite takes them with one line in its conftest.py:

    from kpr.testing.fixtures import *  # noqa: F403

- tests marked `kernel` are skipped, with the reason, where kernel tests cannot run
  (kpr.testing.kernel_skip_reason: not root, no bcc, ...): never passed silently;
- a run killed before its teardown leaves namespaces and cgroups: the session's start
  removes those whose creating process is dead (never those of runs still going on);
- fixtures: `require_kernel`, `kernel_headers`, `topology` (a fresh kpr.testing.netns
  Topology), `cgroup` (a child cgroup), `pin_dir` (a scratch pin directory), `bpffs` (a
  private bpffs mount), `harness` (a kpr.testing.harness.PluginHarness on node "node1"
  with the service map writer open).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from kpr.testing import kernel_skip_reason

if TYPE_CHECKING:
    from kpr.testing.harness import PluginHarness
    from kpr.testing.netns import Topology

__all__ = [
    "bpffs",
    "cgroup",
    "clear_after",
    "harness",
    "kernel_headers",
    "pin_dir",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_sessionstart",
    "require_kernel",
    "topology",
]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kernel: needs root and a BPF-capable kernel (namespaces, cgroups, BPF)")


def pytest_sessionstart(session: pytest.Session) -> None:
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
def topology(require_kernel: None) -> Iterator["Topology"]:
    """A fresh namespace topology, torn down after the test."""
    from kpr.testing.netns import Topology

    with Topology() as topo:
        yield topo


@pytest.fixture
def cgroup(require_kernel: None) -> Iterator[Path]:
    """A fresh child cgroup under the cgroup2 root, removed after the test."""
    from kpr.bpf.probes import cgroup2_mount
    from kpr.testing.cgroup import child_cgroup

    if cgroup2_mount() is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    with child_cgroup() as path:
        yield path


@pytest.fixture
def pin_dir(require_kernel: None) -> Iterator[Path]:
    """A scratch pin directory, unique to the test; what was pinned there is removed after it."""
    from kpr.testing.bpffs import scratch_pin_dir

    with scratch_pin_dir("kpr-t") as pin:
        yield pin


@pytest.fixture
def bpffs(require_kernel: None) -> Iterator[Path]:
    """A private bpffs mount, unmounted after the test."""
    from kpr.testing.bpffs import private_bpffs

    with private_bpffs("kpr-t") as mnt:
        yield mnt


def clear_after(name: str = "env") -> Any:
    """An autouse fixture for a test module sharing one module-scoped fixture `name` (a
    harness, a cluster): after each test that used it, its `clear()` runs, so the next test
    starts without the services this one applied. `_clean = clear_after("env")`."""

    @pytest.fixture(autouse=True)
    def _clear_after(request: pytest.FixtureRequest) -> Iterator[None]:
        yield
        if name in request.fixturenames:
            request.getfixturevalue(name).clear()

    return _clear_after


@pytest.fixture
def harness(kernel_headers: Path) -> Iterator["PluginHarness"]:
    """A PluginHarness on node "node1" (10.0.0.1) with the service map writer open on a
    scratch pin directory; its plugins are stopped after the test."""
    from kpr.model import NodeInfo
    from kpr.testing.harness import plugin_harness

    with plugin_harness("kpr-t", NodeInfo("node1", addresses=("10.0.0.1",))) as h:
        yield h
