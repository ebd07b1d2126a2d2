"""sockdiag's dumps report the kernel's error instead of an empty list."""

from __future__ import annotations

import errno
import os
import socket

import pytest
from kpr.plugins.socklb import sockdiag
from kpr.testing.netns import Topology

pytestmark = pytest.mark.kernel


def test_a_dump_the_kernel_ends_with_an_error_raises_it() -> None:
    # No diag handler for protocol 255: the kernel ends the dump with NLMSG_DONE carrying
    # -ENOENT (not NLMSG_ERROR); read as "no sockets", socklb would destroy nothing unnoticed.
    with Topology(prefix=f"r1sd{os.getpid() % 100000}") as topo:
        ns = topo.add_namespace("a")
        with pytest.raises(OSError) as caught:
            sockdiag.run_in_netns(ns.path, lambda: sockdiag.dump(socket.AF_INET, 255))
        # The same namespace's TCP dump still works (and is empty: nothing listens there).
        assert sockdiag.run_in_netns(ns.path, lambda: sockdiag.dump(socket.AF_INET, socket.IPPROTO_TCP)) == []
    assert caught.value.errno == errno.ENOENT
    assert "sock_diag dump" in str(caught.value)
