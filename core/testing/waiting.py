"""Small waits the tests share: poll a condition with a deadline (wait_for), check that one holds
for a while (stays), pick a free loopback port."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = ["free_port", "stays", "wait_for", "wait_until"]


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


def stays(
    cond: Callable[[], Any],
    seconds: float,
    what: str = "condition",
    show: Callable[[], Any] | None = None,
    *,
    interval: float = 0.1,
) -> int:
    """Check `cond()` every `interval` s for `seconds` s (at least once, and once more at the
    end); AssertionError naming `what` as soon as it is falsy (or raises one itself), with
    the value and what `show()` says of the state then. Returns how many checks passed."""
    deadline = time.monotonic() + seconds
    checks = 0
    while True:
        value = cond()
        if not value:
            state = f"; state: {show()}" if show is not None else ""
            raise AssertionError(f"{what} stopped holding after {checks} checks (value: {value!r}){state}")
        checks += 1
        left = deadline - time.monotonic()
        if left <= 0:
            return checks
        time.sleep(min(interval, left))


# The name some tests grew up with.
wait_until = wait_for


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now at `host` (the kernel's pick; another test may take it
    later, so bind soon after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
