"""What the core hands each plugin at configure time."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .model import NodeInfo

if TYPE_CHECKING:
    from .config import KprConfig


@dataclass
class PluginContext:
    # The plugin's name: its entry point's name and its config section under `plugins`.
    name: str
    # Node facts as detected or configured; updated before kpr_node_changed.
    node: NodeInfo
    # A logger named kpr.plugins.<name>.
    log: logging.Logger
    # The whole validated agent config, read-only by convention (plugins read their own
    # section from kpr_configure and core keys such as bpf.pinPath from here).
    config: "KprConfig"
    # A directory this plugin may keep state in across restarts.
    state_dir: Path
