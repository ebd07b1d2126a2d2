"""Small waits the tests share: poll a condition with a deadline, pick a free loopback port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["free_port", "wait_for", "wait_until"]


def wait_for(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    what: str = "condition",
    show: Callable[[], Any] | None = None,
    *,
    interval: float = 0.02,
) -> Any:
    """The first truthy value of `cond()`; AssertionError naming `what` after `timeout` s,
    with the last value seen and, when given, what `show()` says of the state then (a wait
    that fails should say why)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            state = f"; state: {show()}" if show is not None else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {value!r}){state}")
        time.sleep(interval)


# The name some tests grew up with.
wait_until = wait_for


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now at `host` (the kernel's pick; another test may take it
    later, so bind soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
