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

    # allow_inf_nan=False: `.inf` and `.nan` are refused for every float key, core and plugin.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, allow_inf_nan=False
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
    # Seconds a manifests directory that held objects may stay empty (no manifest files, or
    # only files without objects) before kpr believes it and deletes them; until then the
    # last good state stays and status warns. 0 trusts emptiness at once.
    empty_grace_period: float = Field(60.0, ge=0, le=86400)
    # Bytes a manifest file may hold; a bigger one is reported and its last good objects
    # kept. Checked before the file is read into memory.
    max_file_size: int = Field(10 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
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
    # max_entries of the service maps, for clusters beyond the defaults (kpr.bpf.maps.SPECS:
    # kprSvc 262144, kprBackend 131072, kprRevnat 65536, kprAffinity 65536, kprMaglev 32768,
    # kprSrcrange 16384, kprSlots 524288: backend slots, each frontend scope's range rounded up
    # to 1, 2, 3, 4, 6, 8, 12, 16, ...; README "Sizing the service maps"). A map pinned with another size
    # is kept when its key is not set here and refused at start when it is (kpr cleanup
    # removes the pins).
    map_sizes: dict[
        Literal["kprSvc", "kprSlots", "kprBackend", "kprRevnat", "kprAffinity", "kprMaglev", "kprSrcrange"],
        Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)],
    ] = {}

    # Keep compiled programs under agent.stateDir/bpf-cache, so that a start without pinned
    # links to adopt (after a reboot) loads them instead of compiling (kpr.bpf.progcache).
    program_cache: bool = True

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


def short_repr(value: Any, limit: int = 80) -> str:
    """repr() cut to one short line: a value quoted in an error is a hint, not a dump."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) or short_repr(value) in msg
        shown = "" if quiet else f" (got {short_repr(value)})"
        lines.append(f"{path}: {msg}{shown}")
    return lines


# Bounds on a config document, far above any real one: the deepest real key (a BGP peer's
# selector) nests 7 levels, and a config has a few hundred values.
MAX_CONFIG_BYTES = 1024 * 1024
MAX_DEPTH = 32
MAX_NODES = 100_000


def yaml_reason(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own text spans lines)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or " ".join(str(e).split())
    context = getattr(e, "context", None)
    context_mark = getattr(e, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = f"not valid YAML{where}: {problem}"
    if context:
        # Often the real mistake: an unclosed bracket is only noticed lines later.
        started = f" started at line {context_mark.line + 1}" if context_mark is not None else ""
        text += f" ({context}{started})"
    return text


def shape_problem(data: Any, max_depth: int = MAX_DEPTH, max_nodes: int = MAX_NODES, depth0: int = 1) -> str:
    """Why a parsed document is unreasonable (too deep, or too big once YAML aliases are
    expanded: a "billion laughs" is a few lines of anchors), or "". Walks without recursion
    and stops at the first bound, so the cost is bounded too. `depth0` is the depth of `data`
    itself (0 for a list of documents)."""
    if not isinstance(data, (dict, list)):
        return ""
    stack: list[tuple[Any, int]] = [(data, depth0)]
    nodes = 1
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value
        nodes += len(children)
        if nodes > max_nodes:
            return f"more than {max_nodes} values (YAML aliases expanded)"
        if depth >= max_depth and children:
            return f"nested deeper than {max_depth} levels"
        # Only containers go on the stack: scalars are counted above, in bulk.
        stack.extend((c, depth + 1) for c in children if type(c) is dict or type(c) is list)
    return ""


def load_yaml(text: str, loader: Any = yaml.SafeLoader, many: bool = False, max_depth: int = MAX_DEPTH) -> Any:
    """The document in `text` (with `many`, the list of them), read with a safe `loader`;
    whatever the text, a failure is a ValueError with a one-line reason."""
    try:
        return list(yaml.load_all(text, Loader=loader)) if many else yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise ValueError(yaml_reason(e)) from None
    except RecursionError:
        raise ValueError(f"not valid YAML: nested deeper than {max_depth} levels") from None
    except (ValueError, TypeError, OverflowError) as e:
        # A scalar YAML resolves but Python refuses, e.g. the date 2024-13-45.
        raise ValueError(f"not valid YAML: {' '.join(str(e).split())}") from None


def _load_yaml(text: str) -> Any:
    """The one document in `text`; raises ValueError with a one-line reason."""
    if "\x00" in text:
        raise ValueError(f"a binary file, not YAML text (NUL byte at offset {text.index(chr(0))})")
    return load_yaml(text)


def parse_config(text: str, source: str = "") -> KprConfig:
    """Parse and validate the core keys of a config document. Plugin sections come later."""
    try:
        data = _load_yaml(text)
    except ValueError as e:
        raise ConfigError([str(e)], source) from None
    shape = shape_problem(data)
    if shape:
        raise ConfigError([f"(top level): {shape}"], source)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"(top level): must be a mapping of keys, got {type(data).__name__}"], source)
    plugins = data.get("plugins")
    if plugins is not None and not isinstance(plugins, dict):
        raise ConfigError([f"plugins: must be a mapping of plugin names, got {short_repr(plugins)}"], source)
    for name, section in (plugins or {}).items():
        if section is None:
            plugins[name] = {}
        elif not isinstance(section, dict):
            raise ConfigError([f"plugins.{name}: must be a mapping, got {short_repr(section)}"], source)
    try:
        return KprConfig.model_validate(data)
    except pydantic.ValidationError as e:
        raise ConfigError(format_errors(e), source) from None


def load_config(path: Path | str = DEFAULT_CONFIG_PATH) -> KprConfig:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # Bounded: a config path pointing at /dev/zero or a huge file must not eat memory.
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], str(path)) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([f"(top level): larger than {MAX_CONFIG_BYTES} bytes; not a kpr config"], str(path))
    if b"\x00" in data:
        raise ConfigError([f"(top level): a binary file, not YAML text (NUL byte at offset {data.index(0)})"], str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([f"(top level): not UTF-8 text (byte {e.start})"], str(path)) from None
    return parse_config(text, str(path))
