"""`make demo`, first part: kpr as it runs in a cluster, on one machine.

A control-plane namespace runs the test API server (kpr.testing.apiserver: test equipment,
in this process); the real kubectl applies examples/cluster/nodes.yaml and
examples/manifests/ to it; two node namespaces each run a `kpr run` agent with
`source.kind: kubernetes`, pointed at the API server's address, and socklb on a child cgroup
of their own. Pods are namespaces behind their node. Everything is made by kpr.testing's
harness and removed on exit, failures included; the machine's own interfaces, routes and
root cgroup are never touched.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kpr import api as kapi
from kpr.bpf.cleanup import scratch_pin_dir
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.cgroup import child_cgroup, run_in_cgroup
from kpr.testing.netns import Topology

ROOT = Path(__file__).resolve().parent.parent
RUN = Path("/run/kpr-demo/cluster")
KPR = [sys.executable, "-m", "kpr.cli"]
API_ADDR = "10.88.0.1"  # the control plane's address, on its loopback, routed to by both nodes
NODES = {"node1": ("10.88.1.1", "10.88.1.2"), "node2": ("10.88.2.1", "10.88.2.2")}
# Pods with the endpoint addresses examples/manifests/ names (10-web.yaml, 20-nodeport.yaml).
PODS = {"web1": ("node1", "10.244.0.11"), "web2": ("node1", "10.244.0.12"), "np2": ("node2", "10.244.1.21")}
CLIENT = ("node1", "cli", "10.244.0.100")

SERVER = """
import http.server, sys
name = sys.argv[1]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {name}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), H).serve_forever()
"""

GET = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
    body = b""
    while (c := s.recv(4096)): body += c
    print(body.split(b"\\r\\n\\r\\n", 1)[1].decode().strip())
except OSError as e:
    print(f"({type(e).__name__}: {e.strerror or e})")
"""

CONFIG = """\
node: {{name: {node}, devices: [eth0]}}            # addresses and zone: from the Node object
source:
  kind: kubernetes
  apiServer: "https://{api}:6443"                   # direct, as a kube-proxy replacement must
  tokenFile: {token}
  caFile: {ca}
bpf: {{pinPath: {pin}}}
api: {{socket: {run}/{node}.sock}}
metrics: {{address: ""}}
agent: {{stateDir: {run}/{node}-state, shutdownTimeout: 5}}
plugins:
  socklb: {{enabled: true, cgroupPath: {cgroup}}}
"""


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, stack: contextlib.ExitStack):
        self.stack = stack
        self.topo = stack.enter_context(Topology())
        self.configs: dict[str, Path] = {}
        self.cgroups: dict[str, Path] = {}
        self.started: dict[str, float] = {}

    def kubectl(self, *args: str, check: bool = True) -> str:
        out = self.topo.run("cp", [self.kubectl_bin, "--kubeconfig", str(self.kubeconfig), *args], check=False, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout + out.stderr

    def build(self) -> None:
        topo = self.topo
        topo.add_router("cp")
        topo.run("cp", f"ip addr add {API_ADDR}/32 dev lo")
        for node, (cp_side, node_side) in NODES.items():
            topo.add_node(node)
            topo.link("cp", node, f"{cp_side}/30", f"{node_side}/30")
            topo.add_route(node, f"{API_ADDR}/32", via=cp_side)
        for pod, (node, ip) in PODS.items():
            topo.add_pod(node, pod, ip)
            topo.popen(pod, [sys.executable, "-c", SERVER, pod])
        topo.add_pod(CLIENT[0], CLIENT[1], CLIENT[2])

    def api_server(self) -> None:
        # The listening socket is made inside the control-plane namespace; its threads serve
        # it from there, whatever namespace they run in.
        with self.topo["cp"].enter():
            self.api = self.stack.enter_context(KubeApiServer(host=API_ADDR, port=6443, bookmark_interval=30))
        self.kubectl_bin = shutil.which("kubectl") or "kubectl"
        self.kubeconfig = Path(self.api.write_kubeconfig(RUN / "kubeconfig"))

    def cgroup_view(self) -> Path:
        # `ip netns exec` remounts /sys, so the agents would not see /sys/fs/cgroup/...: they
        # get the cgroup v2 hierarchy through a view mounted here (unmounted on exit).
        view = RUN / "cgroup"
        view.mkdir(exist_ok=True)
        if subprocess.run(["mountpoint", "-q", str(view)]).returncode != 0:
            subprocess.run(["mount", "-t", "cgroup2", "none", str(view)], check=True)
            self.stack.callback(subprocess.run, ["umount", str(view)])
        return view

    def agent(self, node: str) -> None:
        pin = self.stack.enter_context(scratch_pin_dir(f"kpr-demo-{node}"))
        cgroup = self.cgroups[node] = self.stack.enter_context(child_cgroup(f"kpr-demo-{node}", parent=self.view))
        cfg = self.configs[node] = RUN / f"{node}.yaml"
        cfg.write_text(CONFIG.format(node=node, api=API_ADDR, token=self.api.token_file, ca=self.api.ca_file, pin=pin / "kpr", run=RUN, cgroup=cgroup))
        log = open(RUN / f"{node}.log", "w")
        self.stack.callback(log.close)
        self.started[node] = time.monotonic()
        proc = self.topo.popen(node, [*KPR, "run", "--config", str(cfg)], stderr=log)
        # Stop the agent (its programs detach) before the cgroup and pins go.
        self.stack.callback(self._stop_agent, proc, cfg)

    @staticmethod
    def _stop_agent(proc: subprocess.Popen, cfg: Path) -> None:
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
        subprocess.run([*KPR, "cleanup", "--config", str(cfg)], capture_output=True)

    def wait_ready(self, node: str, timeout: float = 60) -> float:
        """Seconds from the agent's start to ready (the initial state in its BPF maps)."""
        t0 = self.started[node]
        sock = RUN / f"{node}.sock"
        while time.monotonic() - t0 < timeout:
            with contextlib.suppress(kapi.ApiError, OSError):
                if kapi.get(sock, "/v1/status").get("ready"):
                    return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"the {node} agent was not ready in {timeout} s; see {RUN}/{node}.log")

    def kpr(self, node: str, *args: str) -> str:
        out = subprocess.run([*KPR, *args, "--config", str(self.configs[node])], capture_output=True, text=True)
        return out.stdout + out.stderr

    def get(self, address: str, port: int = 80) -> str:
        node, pod, _ = CLIENT
        out = run_in_cgroup(self.cgroups[node], [sys.executable, "-c", GET, address, str(port)], self.topo[pod], check=False)
        return (out.stdout or out.stderr).strip()


def main() -> int:
    RUN.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        d = Demo(stack)
        d.build()
        d.api_server()
        say(f"a virtual cluster: the test API server at https://{API_ADDR}:6443 (namespace {d.topo.netns_name('cp')}), two nodes")
        print(d.kubectl("apply", "-f", str(ROOT / "examples/cluster/nodes.yaml"), "-f", str(ROOT / "examples/manifests/")).rstrip())
        d.view = d.cgroup_view()
        for node in NODES:
            d.agent(node)
        for node in NODES:
            print(f"{node}: agent ready in {d.wait_ready(node):.1f} s")

        say("kubectl get nodes,services -A (the real kubectl)")
        print(d.kubectl("get", "nodes,services", "-A").rstrip())
        say("kpr status on node1 (its address and zone come from its Node object)")
        print(d.kpr("node1", "status").rstrip())
        for node in NODES:
            say(f"kpr service list on {node}")
            print(d.kpr(node, "service", "list").rstrip())

        web = json.loads(d.kubectl("get", "service", "web", "-n", "shop", "-o", "json"))["spec"]["clusterIP"]
        say(f"a pod on node1 (10.244.0.100) asks the ClusterIP of shop/web, {web}:80, four times")
        for _ in range(4):
            print(" ", d.get(web))

        say("kubectl delete -f examples/manifests/10-web.yaml, then the pod asks again")
        print(d.kubectl("delete", "-f", str(ROOT / "examples/manifests/10-web.yaml")).rstrip())
        time.sleep(0.3)
        print(" ", d.get(web))
        say("kubectl apply -f examples/manifests/10-web.yaml: back (the API server allocates its ClusterIP)")
        t0 = time.monotonic()
        print(d.kubectl("apply", "-f", str(ROOT / "examples/manifests/10-web.yaml")).rstrip())
        web = json.loads(d.kubectl("get", "service", "web", "-n", "shop", "-o", "json"))["spec"]["clusterIP"]
        answer = d.get(web)
        print(f"  {answer}   ({web}, {time.monotonic() - t0:.2f} s after kubectl apply started)")
        print(f"\n(agents' logs: {RUN}/node1.log, {RUN}/node2.log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
