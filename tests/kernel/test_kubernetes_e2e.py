"""The kubernetes source driving the socket LB on a real kernel: `kubectl apply` against the
test API server reaches a pod's connection to the ClusterIP; `kubectl delete` takes it away;
an API server outage leaves the data path serving, and changes flow again after it.

The chain is the agent's: API server -> KubernetesSource -> ObjectStore -> the service map
writer and the socklb plugin (socklb_env's Env, one dispatch per change as the bus does).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from kpr.config import SourceSection
from kpr.kube.informer import JitterBackoff
from kpr.sources.kubernetes import KubernetesSource
from kpr.testing.apiserver import KubeApiServer
from kpr.testing.manifests import endpoint_slice, service, yaml_docs
from kpr.testing.waiting import stays, wait_for

from socklb_env import PODS, PORT, running

pytestmark = pytest.mark.kernel

KUBECTL = shutil.which("kubectl")

class Cluster:
    def __init__(self, api: KubeApiServer, env, source: KubernetesSource, kubeconfig: str, manifests: Path):
        self.api, self.env, self.source, self.kubeconfig, self.manifests = api, env, source, kubeconfig, manifests

    def kubectl(self, *args: str) -> str:
        out = subprocess.run([KUBECTL, "--kubeconfig", self.kubeconfig, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def write(self, backend: str) -> None:
        (self.manifests / "10-service.yaml").write_text(yaml_docs(service("echo", port_name="tcp", protocol="TCP")))
        (self.manifests / "20-slice.yaml").write_text(yaml_docs(
            endpoint_slice("echo", [PODS[backend][0]], port=PORT, port_name="tcp", ready=True)))

    def relists(self) -> tuple[int, int]:
        kinds = self.source.status()["kinds"]
        return kinds["Service"]["relists"], kinds["EndpointSlice"]["relists"]

    def cluster_ip(self) -> str:
        return json.loads(self.kubectl("get", "service", "echo", "-o", "json"))["spec"]["clusterIP"]

    def in_maps(self, ip: str, backend: str) -> bool:
        fe = self.env.writer.read_back()["frontends"].get(f"{ip}:80/TCP external") or {}
        return fe.get("backends") == [f"{PODS[backend][0]}:{PORT}"]

    def answer(self, ip: str) -> str:
        res = self.env.client("tcp", ip, 80, 1)
        return res[0].get("answer") or res[0].get("error", "?")


@pytest.fixture
def cluster(tmp_path):
    if KUBECTL is None:
        pytest.skip("no kubectl: scripts/install-deps.sh installs Debian's kubernetes-client")
    with KubeApiServer(bookmark_interval=0.5) as api, running("kpr-k8s-e2e") as env:
        env.feed()  # the store that hands each model change to the writer and the plugin
        section = SourceSection(kind="kubernetes", apiServer=api.url, tokenFile=api.token_file, caFile=api.ca_file)
        source = KubernetesSource(section, "node1", backoff=JitterBackoff(0.05, 1.0))
        source.start(env.store)
        try:
            wait_for(lambda: env.store.is_synced, 10, "the initial sync")
            manifests = tmp_path / "manifests"
            manifests.mkdir()
            yield Cluster(api, env, source, api.write_kubeconfig(tmp_path / "kubeconfig"), manifests)
        finally:
            source.stop()


def test_kubectl_apply_reaches_a_pods_connection_and_delete_removes_it(cluster):
    c = cluster
    c.write("be1")
    relists = c.relists()
    c.kubectl("apply", "-f", str(c.manifests))
    applied = time.monotonic()
    ip = c.cluster_ip()
    # No clock bound (270 ms here at load 7.5, a loaded CI is slower): that the changes came
    # by the watches, not by listing again, is checked at the end.
    wait_for(lambda: c.in_maps(ip, "be1"), 10, "the ClusterIP in the maps after kubectl apply")
    in_maps = time.monotonic() - applied
    assert c.answer(ip) == "be1"
    print(f"kubectl apply -> maps {in_maps * 1000:.0f} ms")

    # A second apply patches the slice (strategic merge, as kubectl sends it).
    c.write("be2")
    c.kubectl("apply", "-f", str(c.manifests))
    wait_for(lambda: c.in_maps(ip, "be2"), 10, "the new backend")
    assert c.answer(ip) == "be2"

    c.kubectl("delete", "-f", str(c.manifests))
    wait_for(lambda: not c.env.writer.read_back()["frontends"], 10, "the service gone from the maps")
    assert c.answer(ip) != "be2", "nothing translates the ClusterIP any more"
    assert c.relists() == relists, "brought by the watches"


@pytest.mark.slow
def test_api_server_down_for_a_minute_leaves_the_data_path_serving(cluster):
    c = cluster
    c.write("be1")
    c.kubectl("apply", "-f", str(c.manifests))
    ip = c.cluster_ip()
    wait_for(lambda: c.in_maps(ip, "be1"), 10, "the service")
    before = c.env.writer.read_back()

    c.api.down()
    c.api.drop_watches()
    wait_for(lambda: c.source.status()["state"] == "disconnected", 10, "the outage in status")
    stays(lambda: c.answer(ip) == "be1", 60, "be1 answering through the outage", interval=5)
    assert c.env.writer.read_back() == before, "the outage must not touch the maps"
    assert {"Service", "EndpointSlice"} <= set(c.env.store.errors)

    c.api.up()
    c.write("be3")
    c.kubectl("apply", "-f", str(c.manifests))
    wait_for(lambda: c.in_maps(ip, "be3"), 10, "a change after the outage")
    assert c.answer(ip) == "be3"
    wait_for(lambda: c.source.status()["state"] == "watching", 5, "the source healthy again")
    assert not ({"Service", "EndpointSlice"} & set(c.env.store.errors))
