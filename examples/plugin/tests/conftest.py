"""The plugin's tests take kpr's testing kit: its fixtures (harness, topology, cgroup, pin_dir,
...) and its hooks (tests marked `kernel` skipped, with the reason, where they cannot run)."""

import sys
from pathlib import Path

from kpr.testing.fixtures import *  # noqa: F403 - fixtures and hooks, by name

try:
    import kpr_servicelog  # noqa: F401 - installed (pip install ./examples/plugin)
except ImportError:  # run from a checkout (kpr's own suite): the package next to this directory
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
