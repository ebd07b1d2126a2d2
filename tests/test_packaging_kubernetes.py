"""packaging/kubernetes: the manifests that run kpr as a DaemonSet in place of kube-proxy.

No cluster and no container engine here: the manifests are checked against the kubernetes
client's models (every field known), the RBAC against the API calls in kpr's code, the
ConfigMap's kpr.yaml with the real `kpr check-config`, and the whole directory with the real
kubectl against kpr.testing.apiserver.KubeApiServer. The image (Containerfile) is not built.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import kpr
from kpr import api, cli
from kpr.config import load_config
from kpr.pluginmanager import build_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
DIR = ROOT / "packaging" / "kubernetes"
UNIT = ROOT / "packaging" / "systemd" / "kpr.service"
NAMESPACE = "kube-system"
KUBECTL = "/usr/bin/kubectl"

# What kpr may do, as (API group, resource, verb). Cluster-wide: list and watch the four kinds
# the kubernetes source follows. In NAMESPACE only: announce_arp's Leases.
CLUSTER_RULES = {
    (group, resource, verb)
    for group, resource in (("", "services"), ("discovery.k8s.io", "endpointslices"), ("", "nodes"), ("", "pods"))
    for verb in ("list", "watch")
} | {("", "services/status", "patch")}  # lb_ipam's write-back
LEASE_RULES = {("coordination.k8s.io", "leases", verb) for verb in ("get", "list", "watch", "create", "update")}


def documents() -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path, doc))
    return out


def one(kind: str) -> dict:
    found = [doc for _, doc in documents() if doc.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def agent_container() -> dict:
    (container,) = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return container


def kpr_yaml() -> str:
    return one("ConfigMap")["data"]["kpr.yaml"]


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for r in rules
        for group in r.get("apiGroups", [])
        for resource in r.get("resources", [])
        for verb in r.get("verbs", [])
    }


# --- the manifests -------------------------------------------------------------------------


def test_every_manifest_is_an_object_with_a_name():
    docs = documents()
    assert {p.name for p in DIR.glob("*.yaml")} == {p.name for p, _ in docs}
    # `kubectl apply -f packaging/kubernetes/` reads every .yaml file as an object: a
    # kustomization.yaml (no apiVersion, or a kind no server serves) would make it fail.
    assert not (DIR / "kustomization.yaml").exists()
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path.name
        assert doc.get("metadata", {}).get("name"), path.name
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == sorted(
        ["ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet", "Role", "RoleBinding", "ServiceAccount"]
    )
    for _, doc in docs:
        if doc["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["kind"]


def _unknown_fields(value, type_name: str, where: str) -> list[str]:
    """Keys the kubernetes client's models do not know, anywhere below `value`."""
    import kubernetes.client as kc

    m = re.fullmatch(r"List\[(.+)\]", type_name)
    if m:
        return [p for i, item in enumerate(value) for p in _unknown_fields(item, m.group(1), f"{where}[{i}]")]
    m = re.fullmatch(r"Dict\[str, (.+)\]", type_name)
    if m:
        return [p for k, item in value.items() for p in _unknown_fields(item, m.group(1), f"{where}.{k}")]
    model = getattr(kc, type_name, None)
    if model is None or not hasattr(model, "attribute_map"):
        return []  # str, int, bool, object (IntOrString, quantities)
    if not isinstance(value, dict):
        return [f"{where}: expected an object ({type_name}), got {value!r}"]
    by_key = {key: attr for attr, key in model.attribute_map.items()}
    problems = []
    for key, item in value.items():
        attr = by_key.get(key)
        if attr is None:
            problems.append(f"{where}.{key}: unknown field of {type_name}")
        else:
            problems += _unknown_fields(item, model.openapi_types[attr], f"{where}.{key}")
    return problems


def test_every_field_is_one_the_api_knows():
    # The real API server refuses unknown fields (kubectl asks for fieldValidation=Strict);
    # the test server does not check, so check here against the client's generated models.
    pytest.importorskip("kubernetes")
    for path, doc in documents():
        version = doc["apiVersion"].rpartition("/")[2]
        model = f"{version.capitalize()}{doc['kind']}"
        assert _unknown_fields(doc, model, f"{path.name}:{doc['kind']}") == []


def test_unknown_field_check_catches_a_misspelling():
    pytest.importorskip("kubernetes")
    ds = one("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] = "None"
    assert _unknown_fields(ds, "V1DaemonSet", "ds") == [
        "ds.spec.template.spec.containers[0].volumeMounts[0].mountPropogation: unknown field of V1VolumeMount"
    ]


def test_daemonset_runs_the_agent_on_every_node_in_the_host_network(tmp_path):
    ds = one("DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert spec["hostNetwork"] is True
    # Not ClusterFirstWithHostNet: cluster DNS is a ClusterIP nothing serves before kpr does.
    assert spec["dnsPolicy"] == "Default"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["serviceAccountName"] == one("ServiceAccount")["metadata"]["name"]
    c = agent_container()
    assert c["command"] == ["kpr", "run", "--config", "/etc/kpr/kpr.yaml"]
    assert c["image"].endswith(f":{kpr.__version__}")
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["resources"]["requests"]
    config = load_config(_written(kpr_yaml(), tmp_path / "kpr.yaml"))
    assert spec["terminationGracePeriodSeconds"] > config.agent.shutdown_timeout


def test_agent_has_the_systemd_units_capabilities_and_is_not_privileged():
    unit = [l for l in UNIT.read_text().splitlines() if l.startswith("CapabilityBoundingSet=")]
    unit_caps = {c.removeprefix("CAP_") for c in unit[0].split("=", 1)[1].split()}
    sc = agent_container()["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == unit_caps
    assert {"BPF", "NET_ADMIN", "SYS_ADMIN", "PERFMON", "NET_RAW"} <= unit_caps
    # Bidirectional propagation (a bpffs mounted in the pod reaching the host) is allowed
    # only in privileged containers: a privileged init container does that one thing.
    (init,) = one("DaemonSet")["spec"]["template"]["spec"]["initContainers"]
    assert init["securityContext"] == {"privileged": True}
    assert init["volumeMounts"] == [{"name": "bpffs", "mountPath": "/sys/fs/bpf", "mountPropagation": "Bidirectional"}]
    assert "ensure_bpffs('/sys/fs/bpf'" in init["command"][-1]


def test_mounts_match_what_the_config_uses(tmp_path):
    spec = one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in agent_container()["volumeMounts"]}

    def host(path: str) -> dict:
        return volumes[mounts[path]["name"]]["hostPath"]

    config = load_config(_written(kpr_yaml(), tmp_path / "kpr.yaml"))
    # The config file the command names is the ConfigMap's key at the mount.
    cfg_mount = mounts["/etc/kpr"]
    assert volumes[cfg_mount["name"]]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert "kpr.yaml" in one("ConfigMap")["data"]
    # Pinned maps on the host's bpffs, seen as the host mounts it.
    assert Path("/sys/fs/bpf") in Path(config.bpf.pin_path).parents
    assert host("/sys/fs/bpf") == {"path": "/sys/fs/bpf", "type": "DirectoryOrCreate"}
    assert mounts["/sys/fs/bpf"]["mountPropagation"] == "HostToContainer"
    # socklb attaches to the host's cgroup v2 root, at the path it has on the host.
    cg = config.plugin_raw("socklb")["cgroupPath"]
    assert cg == "/sys/fs/cgroup" and host(cg) == {"path": cg, "type": "Directory"}
    assert mounts[cg]["readOnly"] is True
    # bcc's kernel headers from the host, read-only.
    for path in ("/lib/modules", "/usr/src"):
        assert host(path)["path"] == path and mounts[path]["readOnly"] is True
    # The API socket and the state directory on the host, at the same paths.
    sock_dir = str(Path(config.api.socket).parent)
    assert host(sock_dir) == {"path": sock_dir, "type": "DirectoryOrCreate"}
    state = str(config.agent.state_dir)
    assert host(state) == {"path": state, "type": "DirectoryOrCreate"}


# --- RBAC ----------------------------------------------------------------------------------


def _resource(path: str) -> tuple[str, str]:
    """(group, resource) of an API path: /api/v1/namespaces/{namespace}/pods/{name}/status
    is ("", "pods/status"), /apis/discovery.k8s.io/v1/endpointslices ("discovery.k8s.io",
    "endpointslices")."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if rest[:2] == ["namespaces", "{namespace}"] and len(rest) > 2:
        rest = rest[2:]
    return group, rest[0] + (f"/{rest[2]}" if len(rest) > 2 else "")


def _api_calls() -> set[tuple[str, str, str]]:
    """(group, resource, verb) of every API call in kpr's code (core/ but kpr.testing, and
    plugins/): the kubernetes client's typed methods named anywhere (with their
    _with_http_info and _without_preload_content variants), and kpr.kube.client.raw_lister
    paths. A list counts as list and watch: kpr lists only to watch (informers). Any other
    literal API path fails: teach this function what it does.
    """
    import kubernetes.client as kc

    methods: dict[str, str] = {}
    for name in dir(kc):
        cls = getattr(kc, name)
        if not (name.endswith("Api") and inspect.isclass(cls)):
            continue
        for attr in dir(cls):
            serialize = getattr(cls, f"_{attr}_serialize", None)
            if serialize is None or attr.startswith("_"):
                continue
            m = re.search(r"resource_path='([^']+)'", inspect.getsource(serialize))
            if m:
                methods[attr] = m.group(1)
    verbs = (
        ("list_", ("list", "watch")), ("read_", ("get",)), ("create_", ("create",)),
        ("replace_", ("update",)), ("patch_", ("patch",)), ("delete_collection_", ("deletecollection",)),
        ("delete_", ("delete",)),
    )
    api_path = re.compile(r"^/apis?/")
    used: set[tuple[str, str, str]] = set()
    sources = [p for p in (ROOT / "core").rglob("*.py") if "testing" not in p.relative_to(ROOT / "core").parts]
    sources += list((ROOT / "plugins").rglob("*.py"))
    for path in sources:
        tree = ast.parse(path.read_text())
        raw_paths: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) == "raw_lister":
                arg = node.args[1] if len(node.args) > 1 else None
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                assert isinstance(arg, ast.Constant) and isinstance(arg.value, str), f"{where}: raw_lister of a computed path"
                raw_paths.add(id(arg))
                used |= {(*_resource(arg.value), v) for v in ("list", "watch")}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and api_path.match(node.value):
                assert id(node) in raw_paths, f"{path.relative_to(ROOT)}:{node.lineno}: an API path {node.value!r} used other than by raw_lister"
            if not isinstance(node, ast.Attribute):
                continue
            name = re.sub(r"_(with_http_info|without_preload_content)$", "", node.attr)
            if name in methods:
                verb = next(v for prefix, v in verbs if name.startswith(prefix))
                used |= {(*_resource(methods[name]), v) for v in verb}
    return used


def test_cluster_role_is_exactly_what_kpr_reads():
    role = one("ClusterRole")
    assert rule_set(role["rules"]) == CLUSTER_RULES
    for r in role["rules"]:
        assert "resourceNames" not in r and "nonResourceURLs" not in r
    binding = one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    sa = one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]


def test_lease_role_is_in_the_namespace_of_the_leases():
    role = one("Role")
    assert rule_set(role["rules"]) == LEASE_RULES
    assert role["metadata"]["namespace"] == NAMESPACE
    binding = one("RoleBinding")
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    sa = one("ServiceAccount")["metadata"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["name"], "namespace": sa["namespace"]}]
    from kpr.plugins.announce_arp.config import AnnounceARPConfig

    field = AnnounceARPConfig.model_fields.get("lease_namespace")
    if field is not None:
        assert field.default == NAMESPACE


def test_rbac_follows_the_api_calls_in_kprs_code():
    pytest.importorskip("kubernetes")
    used = _api_calls()
    granted = rule_set(one("ClusterRole")["rules"]) | rule_set(one("Role")["rules"])
    # Everything kpr calls is granted...
    assert used - granted == set(), "kpr calls the API for these: grant them in packaging/kubernetes"
    # ...and nothing it does not call.
    assert CLUSTER_RULES - used == set(), "granted but never called: remove from clusterrole.yaml"
    if any(resource == "leases" for _, resource, _ in used):  # announce_arp's Lease membership
        assert LEASE_RULES - used == set(), "granted but never called: remove from role.yaml"


# --- the config ----------------------------------------------------------------------------


def _written(text: str, path: Path) -> Path:
    path.write_text(text)
    return path


def test_configmap_passes_check_config(tmp_path):
    path = _written(kpr_yaml(), tmp_path / "kpr.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "kpr.cli", "check-config", "--config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "plugins enabled: socklb, tc_nodeport" in out.stdout
    config = load_config(path)
    build_plugin_manager(config)
    assert config.source.kind == "kubernetes"
    assert config.enabled_plugins() == ["socklb", "tc_nodeport"]
    # The probes use the metrics port.
    port = int(config.metrics.address.rpartition(":")[2])
    c = agent_container()
    for probe in ("startupProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port
        assert c[probe]["httpGet"]["host"] == config.metrics.address.rpartition(":")[0]


def test_commented_plugins_are_valid_once_uncommented(tmp_path):
    # The other plugins are shown commented at the plugin level ("  # name:"); uncommented,
    # the example must pass check-config too.
    lines, in_plugins = [], False
    for line in kpr_yaml().splitlines():
        if line.startswith("plugins:"):
            in_plugins = True
        elif in_plugins and line.startswith("  # "):
            line = "  " + line[4:]
        lines.append(line)
    path = _written("\n".join(lines) + "\n", tmp_path / "all.yaml")
    config = load_config(path)
    build_plugin_manager(config)
    assert set(config.enabled_plugins()) == {"socklb", "tc_nodeport", "xdp_nodeport", "announce_arp", "announce_bgp", "lb_ipam"}


# --- the readiness probe -------------------------------------------------------------------


def _status(ready: bool, healthy: bool) -> dict:
    return {
        "version": kpr.__version__,
        "node": {"name": "node1", "addresses": ["10.0.0.1"], "devices": ["eth0"], "zone": None},
        "uptimeSeconds": 3.0,
        "source": {
            "kind": "kubernetes", "synced": ready, "errors": {}, "state": "watching",
            "server": "https://10.0.0.1:6443", "connection": "apiServer",
        },
        "services": 1,
        "frontends": 1,
        "backends": 1,
        "ready": ready,
        "plugins": {"socklb": {"healthy": healthy, "message": "", "counters": {}, "bus": {}}},
    }


@pytest.mark.parametrize(
    "ready,healthy,expected",
    [(True, True, 0), (False, True, 1), (True, False, 1), (None, None, 1)],
    ids=["ready", "syncing", "plugin-failing", "no-agent"],
)
def test_readiness_probe_reads_kpr_status(tmp_path, monkeypatch, capsys, ready, healthy, expected):
    """The probe's shell command, run against what `kpr status` really prints and exits with."""
    if ready is None:
        monkeypatch.setattr(api, "get", lambda *a, **k: (_ for _ in ()).throw(api.ApiError("no agent socket")))
    else:
        monkeypatch.setattr(api, "get", lambda *a, **k: _status(ready, healthy))
    rc = cli.main(["status", "--socket", str(tmp_path / "kpr.sock")])
    printed = capsys.readouterr().out
    fake = tmp_path / "bin" / "kpr"
    fake.parent.mkdir()
    (tmp_path / "out").write_text(printed)
    fake.write_text(f"#!/bin/sh\ncat {tmp_path / 'out'}\nexit {rc}\n")
    fake.chmod(0o755)
    probe = agent_container()["readinessProbe"]["exec"]["command"]
    assert probe[:2] == ["sh", "-c"]
    out = subprocess.run(probe, env={"PATH": f"{fake.parent}:/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert out.returncode == expected, (printed, out.stderr)


# --- kubectl apply -------------------------------------------------------------------------


def _kubectl(kubeconfig: str, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"KUBECONFIG": kubeconfig, "HOME": str(home), "PATH": "/usr/bin:/bin"}
    return subprocess.run([KUBECTL, *args], capture_output=True, text=True, env=env, timeout=120)


def test_kubectl_apply_creates_every_object(tmp_path):
    if not shutil.which(KUBECTL):
        pytest.skip(f"{KUBECTL} is not installed")
    from kpr.testing.apiserver import KubeApiServer

    with KubeApiServer() as srv:
        kubeconfig = srv.write_kubeconfig(tmp_path / "kc")
        out = _kubectl(kubeconfig, tmp_path, "apply", "-f", f"{DIR}/")
        assert out.returncode == 0, out.stderr
        created = {l.split()[0] for l in out.stdout.splitlines()}
        assert created == {
            "clusterrole.rbac.authorization.k8s.io/kpr",
            "clusterrolebinding.rbac.authorization.k8s.io/kpr",
            "configmap/kpr-config",
            "daemonset.apps/kpr",
            "role.rbac.authorization.k8s.io/kpr-leases",
            "rolebinding.rbac.authorization.k8s.io/kpr-leases",
            "serviceaccount/kpr",
        }, out.stdout
        # Applying again changes nothing.
        again = _kubectl(kubeconfig, tmp_path, "apply", "-f", f"{DIR}/")
        assert again.returncode == 0, again.stderr
        assert all(l.endswith(" unchanged") for l in again.stdout.splitlines()), again.stdout

        got = _kubectl(kubeconfig, tmp_path, "get", "ds", "-n", NAMESPACE, "-o", "json")
        assert got.returncode == 0, got.stderr
        (ds,) = json.loads(got.stdout)["items"]
        assert ds["metadata"]["name"] == "kpr"
        assert ds["spec"]["template"]["spec"]["containers"][0]["command"] == agent_container()["command"]
        assert [d["metadata"]["name"] for d in srv.list("DaemonSet")] == ["kpr"]
        (cm,) = srv.list("ConfigMap")
        assert cm["data"]["kpr.yaml"] == kpr_yaml()
