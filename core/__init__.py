"""kpr: a kube-proxy replacement for Linux nodes.

This package is core/ in the source tree; built-in plugins live in kpr.plugins (plugins/).
"""

import pluggy

__version__ = "0.1.0"

PROJECT = "kpr"
ENTRY_POINT_GROUP = "kpr.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = ["__version__", "hookimpl", "hookspec", "PROJECT", "ENTRY_POINT_GROUP"]
