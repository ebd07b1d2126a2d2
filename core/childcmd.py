"""The command that runs one of kpr's modules as a child of the agent (the files worker, the
compile child). A module of its own, with nothing to import, so that a caller's path does not
load another's (the files worker's start does not import the program cache)."""

from __future__ import annotations

import sys


def python_module(module: str) -> list[str]:
    """`python -P -m <module>` with the agent's own interpreter (its venv, its version); the
    environment is the caller's to pass (Popen inherits the agent's). -P: the agent's working
    directory is not on the child's sys.path (the child runs as root and the agent trusts what
    it sends back)."""
    return [sys.executable, "-P", "-m", module]
