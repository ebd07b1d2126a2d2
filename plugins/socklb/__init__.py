"""socklb: east-west service load balancing at the socket layer (cgroup BPF hooks).

connect() and UDP sendmsg() to a service address are rewritten to a backend before the
kernel routes anything, so an established connection costs nothing per packet;
getpeername() and recvfrom() show the service address the application dialled. The plugin
compiles plugins/socklb/bpf/socklb.c (decisions in core/bpf/lib/sock.h) against the shared
service maps the core's ServiceMapWriter fills, and attaches it to a cgroup v2 directory.

Enable it with

    plugins:
      socklb:
        enabled: true
"""

from .config import SockLBConfig
from .plugin import SockLB

__all__ = ["SockLB", "SockLBConfig"]
