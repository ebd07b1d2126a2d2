"""The `plugins.xdp_nodeport` config section (the shared keys: kpr.nodeport.config)."""

from __future__ import annotations

from typing import Literal

from pydantic import field_validator

from kpr.nodeport.config import NodePortSection


class XdpNodePortConfig(NodePortSection):
    # How new flows to a backend on another node travel. XDP has SNAT only: DSR inserts a
    # header between L3 and L4 (bpf_skb_adjust_room), which XDP lacks in lib/nodeport.h, so
    # "dsr" and "hybrid" are refused here (use tc_nodeport for them). Services annotated
    # service.kpr.io/lb-mode=dsr are source-NATed by this plugin.
    mode: Literal["snat"] = "snat"
    # How the program is attached: "native" (driver mode; fails on devices without XDP
    # support), "generic" (skb mode, any device, no speed-up), "auto" (native, else generic
    # with a note in status).
    xdp_mode: Literal["native", "generic", "auto"] = "auto"

    @field_validator("mode", mode="before")
    @classmethod
    def _snat_only(cls, v: object) -> object:
        if v in ("dsr", "hybrid"):
            raise ValueError(
                f"{v!r} is not available in XDP (DSR needs bpf_skb_adjust_room, which XDP lacks): "
                "xdp_nodeport supports mode: snat only; use tc_nodeport for dsr/hybrid"
            )
        return v
