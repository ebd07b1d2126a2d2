"""xdp_nodeport: the XDP variant of tc_nodeport (same C code base, core/bpf/lib/nodeport.h,
compiled for XDP). See plugin.py for what XDP does and does not do here.

    plugins:
      xdp_nodeport:
        enabled: true
        mode: snat        # the only mode in XDP (dsr/hybrid: use tc_nodeport)
        xdpMode: auto     # native | generic | auto
"""

from .config import XdpNodePortConfig
from .plugin import XdpNodePort

__all__ = ["XdpNodePort", "XdpNodePortConfig"]
