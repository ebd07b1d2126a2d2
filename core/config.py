"""The agent's config file: one YAML document, camelCase keys, validated with pydantic.

Core keys are modelled here; each plugin validates its own section under ``plugins.<name>``
with the model it returns from ``kpr_config_schema`` (see ``kpr.plugins_manager``).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.alias_generators import to_camel

DEFAULT_CONFIG_PATH = Path("/etc/kpr/kpr.yaml")


class ConfigError(Exception):
    """The config is unusable; ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in problems))


class Section(BaseModel):
    """Base for every config section, core and plugin: camelCase keys, unknown keys rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


def _check_ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise ValueError(f"not an IP address: {value!r}") from None


# An IP address in any notation, normalised to Python's text form.
IPAddress = Annotated[str, AfterValidator(_check_ip)]


class NodeSection(Section):
    # This node's name, matched against EndpointSlice nodeName for traffic policy Local.
    # Default: the NODE_NAME environment variable (a DaemonSet sets it from spec.nodeName),
    # then the hostname.
    name: str = Field(default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname(), min_length=1)
    # Node addresses NodePort listens on; empty means the addresses of `devices`.
    addresses: list[IPAddress] = []
    # External devices NodePort programs attach to; empty means those with a default route.
    devices: list[str] = []



class SourceSection(Section):
    # Where services come from: a directory of manifests, or a Kubernetes API server.
    kind: Literal["files", "kubernetes"] = "files"
    # The manifests directory of the files source.
    path: Path = Path("/etc/kpr/services.d")
    # Where the files source keeps its ClusterIP and nodePort allocations.
    state_path: Path = Path("/var/lib/kpr/allocations.json")
    # Seconds between scans of the manifests directory.
    poll_interval: float = Field(0.5, gt=0, le=60)
    # --- the kubernetes source: how to reach the API server, first match wins ---
    # A direct address ("https://10.0.0.1:6443"), as Cilium's k8sServiceHost: the
    # `kubernetes` ClusterIP is not reachable before kpr itself serves it. Authenticates
    # with tokenFile and trusts caFile.
    api_server: str = ""
    # A kubeconfig file, and optionally the context to use in it.
    kubeconfig: str = ""
    context: str = ""
    # The bearer token (re-read when it changes: projected tokens rotate) and the CA of the
    # API server, for apiServer and in-cluster use; the defaults are the service account's.
    token_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    ca_file: Path = Path("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt")
    # Client-side rate limit on requests to the API server (a token bucket).
    qps: float = Field(20.0, gt=0, le=10000)
    burst: int = Field(40, ge=1, le=100000)
    # Objects per page of the initial lists and relists.
    page_size: int = Field(500, ge=1, le=100000)

    @field_validator("api_server")
    @classmethod
    def _api_server(cls, v: str) -> str:
        if v and not v.startswith("https://"):
            raise ValueError(f"must be an https:// URL (TLS is always verified), got {v!r}")
        return v.rstrip("/")


class PortRange(BaseModel):
    first: int
    last: int

    def __contains__(self, port: int) -> bool:
        return self.first <= port <= self.last

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"


class ServiceSection(Section):
    # Ports NodePort services may use, "first-last" as in kube-apiserver's flag.
    node_port_range: str = "30000-32767"
    # CIDRs (one per family) ClusterIPs are allocated from by the files source; optional.
    cluster_cidr: list[str] = Field([], alias="clusterCIDR")
    # Serve only services labelled service.kubernetes.io/service-proxy-name=<this>; empty
    # serves only services without the label (as kube-proxy does).
    proxy_name: str = ""

    @field_validator("node_port_range")
    @classmethod
    def _range(cls, v: str) -> str:
        parts = v.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"must look like 30000-32767, got {v!r}")
        first, last = (int(p) for p in parts)
        if not 1 <= first <= last <= 65535:
            raise ValueError(f"must be an ascending range within 1-65535, got {v!r}")
        return f"{first}-{last}"

    @field_validator("cluster_cidr", mode="before")
    @classmethod
    def _cidrs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [c.strip() for c in v.split(",") if c.strip()]
        if not isinstance(v, list):
            return v
        out, families = [], set()
        for c in v:
            try:
                net = ipaddress.ip_network(str(c), strict=True)
            except ValueError as e:
                raise ValueError(f"not a CIDR: {c!r} ({e})") from None
            if net.version in families:
                raise ValueError(f"two CIDRs of IPv{net.version}: at most one per family")
            families.add(net.version)
            out.append(str(net))
        return out

    @property
    def port_range(self) -> PortRange:
        first, last = (int(p) for p in self.node_port_range.split("-"))
        return PortRange(first=first, last=last)


class BpfSection(Section):
    # bpffs directory every kpr map and program is pinned under.
    pin_path: Path = Path("/sys/fs/bpf/kpr")
    # max_entries of the service maps, for clusters beyond the defaults (65536 frontend
    # slots, 65536 backends, 65536 reverse-NAT entries): keys kprSvc, kprBackend, kprRevnat,
    # kprAffinity. Maps already pinned with other sizes are refused at start (kpr cleanup
    # removes them).
    map_sizes: dict[Literal["kprSvc", "kprBackend", "kprRevnat", "kprAffinity"], Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)]] = {}

    def map_size_overrides(self) -> dict[str, int]:
        """map_sizes keyed by map name (kprSvc -> kpr_svc)."""
        return {"kpr_" + k[3:].lower(): v for k, v in self.map_sizes.items()}


class ApiSection(Section):
    # Unix socket the CLI talks to; created with root-only permissions.
    socket: Path = Path("/run/kpr/kpr.sock")


class MetricsSection(Section):
    # host:port for Prometheus metrics; "" disables the endpoint.
    address: str = "127.0.0.1:9963"

    @field_validator("address")
    @classmethod
    def _addr(cls, v: str) -> str:
        if v == "":
            return v
        host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"must be host:port or empty, got {v!r}")
        _check_ip(host.strip("[]"))
        return v


class LogSection(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"


class AgentSection(Section):
    # Seconds a shutdown may take before the agent exits anyway.
    shutdown_timeout: float = Field(10.0, gt=0, le=300)
    # Seconds between level-based resyncs that re-deliver every service; 0 disables.
    resync_interval: float = Field(300.0, ge=0)
    # Directory for state kept across restarts (allocations, plugin state).
    state_dir: Path = Path("/var/lib/kpr")


class PluginToggle(BaseModel):
    """The core's part of every plugin section; the rest is the plugin's."""

    model_config = ConfigDict(extra="allow")
    enabled: bool = False


class KprConfig(Section):
    node: NodeSection = NodeSection()
    source: SourceSection = SourceSection()
    service: ServiceSection = ServiceSection()
    bpf: BpfSection = BpfSection()
    api: ApiSection = ApiSection()
    metrics: MetricsSection = MetricsSection()
    log: LogSection = LogSection()
    agent: AgentSection = AgentSection()
    # plugins.<name>: {enabled: bool, ...the plugin's own keys}
    plugins: dict[str, PluginToggle] = {}
    # Validated sections of the enabled plugins, filled in by kpr.pluginmanager.build_plugin_manager.
    plugin_sections: dict[str, Any] = Field(default_factory=dict, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _no_internal_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("pluginSections" in data or "plugin_sections" in data):
            raise ValueError("pluginSections is not a config key")
        return data

    def enabled_plugins(self) -> list[str]:
        return [name for name, toggle in self.plugins.items() if toggle.enabled]

    def plugin_raw(self, name: str) -> dict[str, Any]:
        toggle = self.plugins.get(name)
        if toggle is None:
            return {}
        return dict(toggle.model_extra or {})


def format_errors(err: pydantic.ValidationError, prefix: tuple[str | int, ...] = ()) -> list[str]:
    """One line per problem: the dotted key path, what is wrong, and the value given."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in (*prefix, *e["loc"])]
        path = ".".join(loc) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        value = e.get("input")
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) or repr(value) in msg
        shown = "" if quiet else f" (got {value!r})"
        lines.append(f"{path}: {msg}{shown}")
    return lines


def parse_config(text: str, source: str = "") -> KprConfig:
    """Parse and validate the core keys of a config document. Plugin sections come later."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError([f"not valid YAML: {e}"], source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys, got {type(data).__name__}"], source)
    plugins = data.get("plugins")
    if plugins is not None and not isinstance(plugins, dict):
        raise ConfigError([f"plugins: must be a mapping of plugin names, got {plugins!r}"], source)
    for name, section in (plugins or {}).items():
        if section is None:
            plugins[name] = {}
        elif not isinstance(section, dict):
            raise ConfigError([f"plugins.{name}: must be a mapping, got {section!r}"], source)
    try:
        return KprConfig.model_validate(data)
    except pydantic.ValidationError as e:
        raise ConfigError(format_errors(e), source) from None


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> KprConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], str(path)) from None
    return parse_config(text, str(path))
