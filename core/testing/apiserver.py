"""A small Kubernetes API server for tests: the wire protocol, in memory, with faults.

No kube-apiserver can run where kpr's tests run, yet the Kubernetes source and the tests
around it need one that the real ``kubectl`` and the ``kubernetes`` Python client accept.
``KubeApiServer`` is that: test equipment, never part of the agent.

What it speaks, over HTTPS (a CA made per server with trustme) with bearer-token auth:

- discovery (/version, /api, /apis, /api/v1, /apis/<group>/<version>) in the plain format;
  kubectl asks for aggregated discovery in its Accept header and falls back to the plain one
  when the Content-Type says so;
- just enough OpenAPI for plain ``kubectl apply -f`` (no --validate=false): kubectl refuses
  to apply when it cannot download OpenAPI, unless the document says the server validates
  fields itself (the ``fieldValidation`` parameter on each kind's PATCH). /openapi/v3 (1.28+)
  and /openapi/v2 (1.27, protobuf only) say exactly that and carry no schemas, so kubectl
  computes its strategic merge patches from the types compiled into it;
- the resources in ``RESOURCES`` (one line each), namespaced and cluster-scoped paths and the
  all-namespaces lists, with the status subresource where the real server has one;
- get, list (limit and continue over a consistent snapshot, label and field selectors),
  watch (replay from a resourceVersion, synthetic ADDED from none or "0", bookmarks,
  timeoutSeconds, selectors with objects leaving a selector sent as DELETED, 410 "Expired"
  as an in-stream ERROR event), create, update (409 on a stale resourceVersion), patch
  (JSON merge, JSON patch, strategic merge with the merge keys of the common lists and the
  directives kubectl emits), delete and deletecollection;
- Service defaulting and ClusterIP / nodePort / healthCheckNodePort allocation (from
  10.96.0.0/12 and fd00:10:96::/112, 30000-32767) through ``kpr.allocator.Allocator``;
- errors as Status objects, a malformed body as 400.

Deviations from the real server, on purpose: namespaces need not exist before objects are
created in them; create keeps a given status (so a manifest's status.loadBalancer reaches
the agent, as with the files source; main-resource updates and patches keep the old status
as the real server does, and ``update_status`` or the HTTP status subresource change it);
fieldValidation=Strict is accepted but unknown fields are kept, not refused; there is no
admission, no controllers (no Endpoints mirrored from EndpointSlices, no pods for a
DaemonSet), no garbage collection, no finalizer handling and no server-side apply.
``kubectl get`` gets Tables with the real columns for the common kinds (Name and Age for
the others), in lists and in ``get -w`` streams.

Faults, each observable by a client: ``drop_watches``, ``fail``, ``stall``, ``expire``,
``rotate_token``, ``down`` / ``up``. ``requests`` records every request for assertions.
"""

from __future__ import annotations

import base64
import collections
import copy
import datetime
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import shutil
import socket
import ssl
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

import yaml

from ..allocator import AllocationError, Allocator
from ..config import PortRange

log = logging.getLogger(__name__)

SERVICE_CIDRS = ("10.96.0.0/12", "fd00:10:96::/112")
NODE_PORT_RANGE = PortRange(first=30000, last=32767)
# What /version reports unless told otherwise. google-cloud-cli's kubectl dispatcher runs the
# kubectl of the server's minor version (1.27..1.33 are installed side by side).
SERVER_VERSION = (1, 33)
# Namespaces a fresh cluster has.
INITIAL_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
# Consistent-list snapshots kept for continue tokens; an evicted one answers 410 like a
# compacted one.
SNAPSHOTS = 64

_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
_STATUS_VERBS = ["get", "patch", "update"]
_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


@dataclass(frozen=True)
class Resource:
    """One API resource; ``fields`` are the field selectors it takes besides metadata.*."""

    group: str
    version: str
    kind: str
    plural: str
    namespaced: bool
    short: tuple[str, ...] = ()
    status: bool = False  # has a status subresource; main-resource writes keep the status
    fields: tuple[str, ...] = ()
    all: bool = False  # in the "all" category (kubectl get all)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_version(self) -> tuple[str, str]:
        return (self.group, self.version)

    @property
    def singular(self) -> str:
        return self.kind.lower()


_EVENT_FIELDS = tuple(
    f"involvedObject.{f}" for f in ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")
) + ("reason", "reportingComponent", "source", "type")
_POD_FIELDS = (
    "spec.nodeName", "spec.restartPolicy", "spec.schedulerName", "spec.serviceAccountName",
    "spec.hostNetwork", "status.phase", "status.podIP", "status.nominatedNodeName",
)

RESOURCES: tuple[Resource, ...] = (
    Resource("", "v1", "Namespace", "namespaces", False, ("ns",), status=True, fields=("status.phase",)),
    Resource("", "v1", "Service", "services", True, ("svc",), status=True, fields=("spec.clusterIP", "spec.type"), all=True),
    Resource("", "v1", "Endpoints", "endpoints", True, ("ep",)),
    Resource("", "v1", "Pod", "pods", True, ("po",), status=True, fields=_POD_FIELDS, all=True),
    Resource("", "v1", "Node", "nodes", False, ("no",), status=True, fields=("spec.unschedulable",)),
    Resource("", "v1", "ConfigMap", "configmaps", True, ("cm",)),
    Resource("", "v1", "Secret", "secrets", True, (), fields=("type",)),
    Resource("", "v1", "ServiceAccount", "serviceaccounts", True, ("sa",)),
    Resource("", "v1", "Event", "events", True, ("ev",), fields=_EVENT_FIELDS),
    Resource("discovery.k8s.io", "v1", "EndpointSlice", "endpointslices", True, ()),
    Resource("coordination.k8s.io", "v1", "Lease", "leases", True, ()),
    Resource("apps", "v1", "DaemonSet", "daemonsets", True, ("ds",), status=True, all=True),
    Resource("apps", "v1", "Deployment", "deployments", True, ("deploy",), status=True, all=True),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    Resource("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    Resource("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    Resource("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
)

_BY_KIND = {r.kind: r for r in RESOURCES}
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_GROUP_VERSIONS = list(dict.fromkeys(r.group_version for r in RESOURCES))


class ApiError(Exception):
    """Answered as a Status object with ``code``."""

    def __init__(self, code: int, message: str, reason: str | None = None, details: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.details = details

    def status(self) -> dict:
        return _status(self.code, self.message, self.reason, self.details)


def _status(code: int, message: str, reason: str | None = None, details: dict | None = None) -> dict:
    out = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details is not None:
        out["details"] = details
    return out


def _details(res: Resource, name: str) -> dict:
    d = {"name": name, "kind": res.plural}
    if res.group:
        d["group"] = res.group
    return d


def _not_found(res: Resource, name: str) -> ApiError:
    return ApiError(404, f'{res.plural}{"." + res.group if res.group else ""} "{name}" not found', details=_details(res, name))


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# --- selectors ---------------------------------------------------------------------------

_LABEL_KEY = re.compile(r"^([a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?/)?[a-z0-9A-Z]([-a-z0-9A-Z_.]*[a-z0-9A-Z])?$")


def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b`` is two requirements)."""
    out, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [p.strip() for p in out if p.strip()]


def parse_label_selector(text: str) -> list[tuple[str, str, frozenset[str]]]:
    """``(key, op, values)`` requirements, ANDed; op is one of = != in notin exists !exists."""
    reqs = []
    for part in _split_top(text or ""):
        m = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            key, op, vals = m.group(1), m.group(2), frozenset(v.strip() for v in m.group(3).split(",") if v.strip())
        elif part.startswith("!"):
            key, op, vals = part[1:].strip(), "!exists", frozenset()
        elif "!=" in part:
            key, _, v = part.partition("!=")
            key, op, vals = key.strip(), "!=", frozenset([v.strip()])
        elif "==" in part:
            key, _, v = part.partition("==")
            key, op, vals = key.strip(), "=", frozenset([v.strip()])
        elif "=" in part:
            key, _, v = part.partition("=")
            key, op, vals = key.strip(), "=", frozenset([v.strip()])
        else:
            key, op, vals = part, "exists", frozenset()
        if not _LABEL_KEY.match(key):
            raise ApiError(400, f"unable to parse requirement: invalid label key {key!r} in selector {text!r}")
        reqs.append((key, op, vals))
    return reqs


def _labels_match(reqs: list, labels: dict) -> bool:
    for key, op, vals in reqs:
        has = key in labels
        if op == "exists":
            ok = has
        elif op == "!exists":
            ok = not has
        elif op == "=":
            ok = has and labels[key] in vals
        elif op == "in":
            ok = has and labels[key] in vals
        elif op == "!=":
            ok = not has or labels[key] not in vals
        else:  # notin
            ok = not has or labels[key] not in vals
        if not ok:
            return False
    return True


def parse_field_selector(text: str, res: Resource) -> list[tuple[str, bool, str]]:
    """``(field, equal, value)`` requirements; a field the resource does not index is a 400,
    as on the real server."""
    allowed = {"metadata.name", "metadata.namespace", *res.fields}
    reqs = []
    for part in _split_top(text or ""):
        if "!=" in part:
            f, _, v = part.partition("!=")
            eq = False
        elif "==" in part:
            f, _, v = part.partition("==")
            eq = True
        elif "=" in part:
            f, _, v = part.partition("=")
            eq = True
        else:
            raise ApiError(400, f"invalid selector: {text!r}; can't understand {part!r}")
        f = f.strip()
        if f not in allowed:
            raise ApiError(400, f'field label not supported: {f}')
        reqs.append((f, eq, v.strip()))
    return reqs


def _field_value(obj: dict, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _fields_match(reqs: list, obj: dict) -> bool:
    return all((_field_value(obj, f) == v) == eq for f, eq, v in reqs)


@dataclass
class _Filter:
    namespace: str | None
    labels: list
    fields: list

    def match(self, obj: dict | None) -> bool:
        if obj is None:
            return False
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        if self.labels and not _labels_match(self.labels, meta.get("labels") or {}):
            return False
        return not self.fields or _fields_match(self.fields, obj)


# --- patches -----------------------------------------------------------------------------


def json_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = json_merge_patch(out.get(k), v)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc: Any, parts: list[str]) -> Any:
    for p in parts:
        if isinstance(doc, dict):
            if p not in doc:
                raise ValueError(f"path /{'/'.join(parts)} does not exist")
            doc = doc[p]
        elif isinstance(doc, list):
            doc = doc[_index(doc, p, False)]
        else:
            raise ValueError(f"path /{'/'.join(parts)} does not exist")
    return doc


def _index(lst: list, p: str, adding: bool) -> int:
    if p == "-" and adding:
        return len(lst)
    if not p.isdigit():
        raise ValueError(f"invalid list index {p!r}")
    i = int(p)
    if i > len(lst) or (i == len(lst) and not adding):
        raise ValueError(f"list index {i} out of range")
    return i


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902, on a deep copy."""
    if not isinstance(ops, list):
        raise ValueError("a JSON patch is a list of operations")
    doc = copy.deepcopy(doc)

    def add(parts: list[str], value: Any) -> None:
        nonlocal doc
        if not parts:
            doc = value
            return
        parent = _walk(doc, parts[:-1])
        if isinstance(parent, dict):
            parent[parts[-1]] = value
        elif isinstance(parent, list):
            parent.insert(_index(parent, parts[-1], True), value)
        else:
            raise ValueError("cannot add to a scalar")

    def remove(parts: list[str]) -> Any:
        if not parts:
            raise ValueError("cannot remove the whole document")
        parent = _walk(doc, parts[:-1])
        if isinstance(parent, dict):
            if parts[-1] not in parent:
                raise ValueError(f"path /{'/'.join(parts)} does not exist")
            return parent.pop(parts[-1])
        if isinstance(parent, list):
            return parent.pop(_index(parent, parts[-1], False))
        raise ValueError("cannot remove from a scalar")

    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise ValueError(f"invalid operation {op!r}")
        kind, parts = op["op"], _pointer(op["path"])
        if kind == "add":
            add(parts, copy.deepcopy(op["value"]))
        elif kind == "remove":
            remove(parts)
        elif kind == "replace":
            remove(parts) if parts else None
            add(parts, copy.deepcopy(op["value"]))
        elif kind == "move":
            value = remove(_pointer(op["from"]))
            add(parts, value)
        elif kind == "copy":
            add(parts, copy.deepcopy(_walk(doc, _pointer(op["from"]))))
        elif kind == "test":
            if _walk(doc, parts) != op.get("value"):
                raise ValueError(f"test failed at {op['path']}")
        else:
            raise ValueError(f"unknown operation {kind!r}")
    return doc


# Strategic merge: how each list merges, keyed by the names of the fields leading to it
# (list indices left out). A key not listed here is atomic (replaced whole), as are
# EndpointSlice endpoints and ports, RBAC rules and subjects, Service externalIPs. "" means
# a list of scalars merged as a set (finalizers).
_POD = ("containers", "initContainers", "ephemeralContainers")
_MERGE_SUFFIX: dict[tuple[str, ...], str] = {
    **{(c,): "name" for c in _POD},
    **{(c, "ports"): "containerPort" for c in _POD},
    **{(c, "env"): "name" for c in _POD},
    **{(c, "volumeMounts"): "mountPath" for c in _POD},
    **{(c, "volumeDevices"): "devicePath" for c in _POD},
    **{(c, "resizePolicy"): "resourceName" for c in _POD},
    ("template", "spec", "volumes"): "name",
    ("template", "spec", "imagePullSecrets"): "name",
    ("template", "spec", "hostAliases"): "ip",
    ("template", "spec", "topologySpreadConstraints"): "topologyKey",
    ("template", "spec", "readinessGates"): "conditionType",
    ("template", "metadata", "finalizers"): "",
    ("template", "metadata", "ownerReferences"): "uid",
    ("metadata", "finalizers"): "",
    ("metadata", "ownerReferences"): "uid",
    ("status", "conditions"): "type",
}
_MERGE_EXACT: dict[tuple[str, tuple[str, ...]], str] = {
    ("Service", ("spec", "ports")): "port",
    ("Pod", ("spec", "volumes")): "name",
    ("Pod", ("spec", "imagePullSecrets")): "name",
    ("Pod", ("spec", "hostAliases")): "ip",
    ("Pod", ("spec", "topologySpreadConstraints")): "topologyKey",
    ("Pod", ("spec", "readinessGates")): "conditionType",
    ("Node", ("status", "addresses")): "type",
    ("Node", ("spec", "podCIDRs")): "",
    ("ServiceAccount", ("secrets",)): "name",
}


def _merge_key(kind: str, path: tuple[str, ...]) -> str | None:
    if (kind, path) in _MERGE_EXACT:
        return _MERGE_EXACT[(kind, path)]
    for n in (3, 2, 1):
        if len(path) >= n and path[-n:] in _MERGE_SUFFIX:
            return _MERGE_SUFFIX[path[-n:]]
    return None


def _clean(value: Any) -> Any:
    """A patch value with the directives taken out, for where it lands whole."""
    if isinstance(value, dict):
        return {
            k: _clean(v)
            for k, v in value.items()
            if not k.startswith("$") and v is not None
        }
    if isinstance(value, list):
        return [_clean(v) for v in value if not (isinstance(v, dict) and v.get("$patch") == "delete")]
    return value


def strategic_merge_patch(kind: str, target: Any, patch: Any, path: tuple[str, ...] = ()) -> Any:
    """The strategic merge patch kubectl sends (apply, edit, patch), for the kinds served."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return _clean(patch)
    if directive == "delete":
        return None
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            gone = value if isinstance(value, list) else []
            if isinstance(out.get(field), list):
                out[field] = [v for v in out[field] if v not in gone]
            continue
        if key.startswith("$"):
            continue
        sub = path + (key,)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            merged = strategic_merge_patch(kind, out.get(key), value, sub)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
        elif isinstance(value, list):
            out[key] = _merge_list(kind, out.get(key), value, sub, patch.get(f"$setElementOrder/{key}"))
        else:
            out[key] = value
    # Lists named only in $setElementOrder (their items unchanged) still get that order.
    for key, order in patch.items():
        if key.startswith("$setElementOrder/"):
            field = key.split("/", 1)[1]
            if field not in patch and isinstance(out.get(field), list):
                out[field] = _reorder(out[field], order, _merge_key(kind, path + (field,)))
    retain = patch.get("$retainKeys")
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _merge_list(kind: str, target: Any, patch: list, path: tuple[str, ...], order: Any) -> list:
    key = _merge_key(kind, path)
    if key is None:
        return _clean(patch)
    current = list(target) if isinstance(target, list) else []
    if key == "":
        out = list(current)
        for v in patch:
            if isinstance(v, dict):
                continue  # a $patch directive; replace of a set is not emitted by kubectl
            if v not in out:
                out.append(v)
        return _reorder(out, order, key) if isinstance(order, list) else out
    if any(isinstance(v, dict) and v.get("$patch") == "replace" for v in patch):
        return [_clean(v) for v in patch if not (isinstance(v, dict) and "$patch" in v)]
    out = list(current)
    for item in patch:
        if not isinstance(item, dict):
            raise ValueError(f"list {'.'.join(path)} merges by {key}: items must be objects")
        k = item.get(key)
        idx = next((i for i, c in enumerate(out) if isinstance(c, dict) and c.get(key) == k), None)
        if item.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append(_clean(item))
        else:
            out[idx] = strategic_merge_patch(kind, out[idx], item, path)
    return _reorder(out, order, key) if isinstance(order, list) else out


def _reorder(items: list, order: list, key: str | None) -> list:
    if key is None:
        return items
    if key == "":
        rank = {json.dumps(v): i for i, v in enumerate(order)}
        ident = json.dumps
    else:
        rank = {json.dumps(o.get(key)): i for i, o in enumerate(order) if isinstance(o, dict)}

        def ident(v: Any) -> str:
            return json.dumps(v.get(key) if isinstance(v, dict) else v)

    # Items the order names take its order; the others (the server's own) keep theirs, after.
    return sorted(items, key=lambda v: (rank.get(ident(v), len(rank)),))


# --- defaulting --------------------------------------------------------------------------


def _default_service(svc: dict) -> None:
    spec = svc.setdefault("spec", {})
    if not isinstance(spec, dict):
        raise ApiError(422, "Service spec must be an object")
    stype = spec.setdefault("type", "ClusterIP")
    if stype not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
        raise ApiError(422, f'Service "{svc["metadata"]["name"]}" is invalid: spec.type: Unsupported value: "{stype}"')
    spec.setdefault("sessionAffinity", "None")
    if spec["sessionAffinity"] == "ClientIP":
        spec.setdefault("sessionAffinityConfig", {"clientIP": {"timeoutSeconds": 10800}})
    ports = spec.get("ports") or []
    if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
        raise ApiError(422, "spec.ports must be a list of objects")
    # Fields the type does not use go, as the real server drops them when the type changes
    # (so kubectl apply can turn a NodePort service back into a ClusterIP one).
    if stype not in ("NodePort", "LoadBalancer"):
        for p in ports:
            p.pop("nodePort", None)
        spec.pop("externalTrafficPolicy", None)
    if stype != "LoadBalancer":
        spec.pop("allocateLoadBalancerNodePorts", None)
    if stype != "LoadBalancer" or spec.get("externalTrafficPolicy") != "Local":
        spec.pop("healthCheckNodePort", None)
    if stype == "ExternalName":
        for k in ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy", "internalTrafficPolicy"):
            spec.pop(k, None)
    for p in ports:
        p.setdefault("protocol", "TCP")
        if stype != "ExternalName" and "port" in p:
            p.setdefault("targetPort", p["port"])
    if stype == "ExternalName":
        return
    spec.setdefault("internalTrafficPolicy", "Cluster")
    if stype in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if stype == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)


def _finish_service(spec: dict) -> None:
    """ipFamilies and ipFamilyPolicy from what was allocated, as the real server reports them."""
    if spec.get("type") == "ExternalName":
        return
    ips = spec.get("clusterIPs") or ([spec["clusterIP"]] if spec.get("clusterIP") else [])
    if ips and ips[0] != "None":
        spec["clusterIP"] = ips[0]
        spec["clusterIPs"] = ips
        spec["ipFamilies"] = [f"IPv{ipaddress.ip_address(i).version}" for i in ips]
        spec.setdefault("ipFamilyPolicy", "SingleStack" if len(ips) == 1 else "RequireDualStack")
    else:
        spec["clusterIP"] = "None"
        spec["clusterIPs"] = ["None"]
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")


# --- events and watches ------------------------------------------------------------------


class _Event:
    __slots__ = ("rv", "type", "res", "obj", "old", "_line")

    def __init__(self, rv: int, type_: str, res: Resource, obj: dict, old: dict | None):
        self.rv, self.type, self.res, self.obj, self.old = rv, type_, res, obj, old
        self._line: bytes | None = None

    def line(self) -> bytes:
        # Serialized once, however many watchers send it (a benign race may do it twice).
        if self._line is None:
            self._line = _dumps({"type": self.type, "object": self.obj}) + b"\n"
        return self._line


class _Watch:
    def __init__(self, res: Resource, flt: _Filter, conn: "_Conn"):
        self.res, self.filter, self.conn = res, flt, conn
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.last_rv = 0
        self.dropped = False


class _Conn:
    """A client connection, so faults can close it."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.closed = False

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass


class _Closed(Exception):
    """The connection went away (fault, shutdown or client)."""


# --- HTTP --------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], api: "KubeApiServer"):
        self.api = api
        super().__init__(addr, _Handler)

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        # The TLS handshake runs here, in the connection's own thread, so a slow client
        # never holds up accept().
        conn = self.api._track(request)
        if conn is None:
            return
        try:
            # Headers and body go out as separate small writes: without this, Nagle and the
            # client's delayed ACK add 40 ms to every request.
            request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            request.settimeout(10)
            tls = self.api._ssl.wrap_socket(request, server_side=True)
            tls.settimeout(None)
        except (OSError, ssl.SSLError) as e:
            log.debug("apiserver.tls_failed client=%s error=%s", client_address, e)
            self.api._untrack(conn)
            conn.close()
            return
        conn.sock = tls
        if conn.closed:  # closed by a fault during the handshake
            conn.close()
            return
        try:
            _Handler(tls, client_address, self, conn)
        except (OSError, ssl.SSLError, _Closed):
            pass
        finally:
            self.api._untrack(conn)
            conn.close()

    def shutdown_request(self, request: Any) -> None:
        pass  # finish_request closed it

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("apiserver.connection_error client=%s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kpr-test-apiserver"

    def __init__(self, request: Any, client_address: Any, server: _HTTPServer, conn: _Conn):
        self.conn = conn
        super().__init__(request, client_address, server)

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("apiserver.http " + fmt, *args)

    def _dispatch(self) -> None:
        self.server.api._serve(self)  # type: ignore[attr-defined]

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _dispatch

    def reply(self, code: int, body: Any, content_type: str = "application/json") -> None:
        data = body if isinstance(body, bytes) else _dumps(body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()


# --- the server --------------------------------------------------------------------------


class KubeApiServer:
    """An in-memory Kubernetes API server on 127.0.0.1 (TLS, bearer token); see the module
    docstring. Use as a context manager, or call ``start`` and ``close``.

    The direct methods (``create``, ``update``, ``update_status``, ``delete``, ``apply_many``)
    write as HTTP requests do, with the same events, and raise ``ApiError`` (``.code``,
    ``.status()``) where HTTP would answer an error. ``version`` is what /version reports."""

    def __init__(
        self, bookmark_interval: float = 60.0, history: int = 10000, port: int = 0,
        version: tuple[int, int] = SERVER_VERSION, host: str = "127.0.0.1",
    ):
        # `host`: an IPv4 address to listen on; 127.0.0.1 unless a test network (make demo's
        # control-plane namespace) needs the server on an address of its own.
        self.host = host
        self.bookmark_interval = bookmark_interval
        self.version = version
        self._lock = threading.RLock()
        self._rv = 0
        self._objects: dict[Resource, dict[tuple[str, str], dict]] = {r: {} for r in RESOURCES}
        self._history: collections.deque[_Event] = collections.deque(maxlen=max(1, history))
        self._floor = 0  # a resourceVersion below this is too old to watch from
        self._watches: dict[Resource, set[_Watch]] = {r: set() for r in RESOURCES}
        self._snapshots: collections.OrderedDict[str, tuple[int, list[dict]]] = collections.OrderedDict()
        self._conns: set[_Conn] = set()
        self._fault = threading.Condition()
        self._fail: tuple[int, float] | None = None  # (code, until)
        self._stall_until = 0.0
        self._closing = False
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._dir = Path(tempfile.mkdtemp(prefix="kpr-apiserver-"))
        self._allocator = Allocator(self._dir / "allocations.json", list(SERVICE_CIDRS), NODE_PORT_RANGE)
        ca = _trustme().CA()
        cert = ca.issue_cert(*dict.fromkeys((self.host, "127.0.0.1", "::1", "localhost")))
        self.ca_file = str(self._dir / "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(self._ssl)
        self.token_file = str(self._dir / "token")
        self.token = ""
        self.rotate_token()
        self._port = port
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        for ns in INITIAL_NAMESPACES:
            self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> "KubeApiServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> "KubeApiServer":
        self.up()
        return self

    def close(self) -> None:
        self.down()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self._port}"

    def up(self) -> None:
        """Listen (again, on the same port after ``down``)."""
        if self._httpd is not None:
            return
        self._closing = False
        self._httpd = _HTTPServer((self.host, self._port), self)
        self._port = self._httpd.server_address[1]
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=f"kpr-apiserver-{self._port}", daemon=True
        )
        self._thread.start()
        log.info("apiserver.up url=%s", self.url)

    def down(self) -> None:
        """Stop listening and close every connection: clients get connection refused."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        with self._lock:
            # Watches are cut, not ended: no terminating chunk, as when a server dies.
            for ws in self._watches.values():
                for w in ws:
                    w.dropped = True
            self._closing = True
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for c in conns:
            c.close()
        with self._fault:
            self._fault.notify_all()
        log.info("apiserver.down url=%s connections=%d", self.url, len(conns))

    # --- auth and kubeconfig -------------------------------------------------------------

    def rotate_token(self) -> str:
        """A new bearer token, written to ``token_file`` (atomically); the old one gets 401."""
        token = secrets.token_urlsafe(32)
        tmp = self.token_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(token)
        os.replace(tmp, self.token_file)
        self.token = token
        log.info("apiserver.token_rotated")
        return token

    def write_kubeconfig(self, path: str | os.PathLike, context: str = "kpr-test", token_file: bool = False) -> str:
        """A kubeconfig for kubectl or ``kubernetes.config``: server, CA and the current token
        (or, with ``token_file``, the token file's path so clients follow rotation)."""
        user: dict[str, str] = {"tokenFile": self.token_file} if token_file else {"token": self.token}
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": context, "cluster": {"server": self.url, "certificate-authority": self.ca_file}}],
            "users": [{"name": context, "user": user}],
            "contexts": [{"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}],
            "current-context": context,
        }
        Path(path).write_text(yaml.safe_dump(cfg, sort_keys=False))
        return str(path)

    # --- faults --------------------------------------------------------------------------

    def drop_watches(self) -> int:
        """Close every open watch stream mid-stream; returns how many."""
        with self._lock:
            watches = [w for ws in self._watches.values() for w in ws]
        for w in watches:
            w.dropped = True
            w.conn.close()
        log.info("apiserver.fault_drop_watches watches=%d", len(watches))
        return len(watches)

    def fail(self, code: int = 500, seconds: float | None = None) -> None:
        """Answer every request with ``code`` (a Status) until ``heal`` or ``seconds`` pass."""
        with self._fault:
            self._fail = (code, time.monotonic() + seconds if seconds is not None else float("inf"))
        log.info("apiserver.fault_fail code=%d seconds=%s", code, seconds)

    def stall(self, seconds: float | None = None) -> None:
        """Requests and watch streams hang without a byte until ``heal`` or ``seconds`` pass."""
        with self._fault:
            self._stall_until = time.monotonic() + seconds if seconds is not None else float("inf")
        log.info("apiserver.fault_stall seconds=%s", seconds)

    def heal(self) -> None:
        with self._fault:
            self._fail = None
            self._stall_until = 0.0
            self._fault.notify_all()
        log.info("apiserver.healed")

    def expire(self) -> None:
        """Forget the event history and list snapshots: any earlier resourceVersion (and any
        continue token) is now too old (410)."""
        with self._lock:
            self._history.clear()
            self._snapshots.clear()
            # A step without an event (real resourceVersions have gaps too): every version
            # handed out so far is now too old, and a relist gets one that is not.
            self._rv += 1
            self._floor = self._rv
        log.info("apiserver.fault_expire resourceVersion=%d", self._rv)

    @property
    def open_watches(self) -> int:
        with self._lock:
            return sum(len(ws) for ws in self._watches.values())

    @property
    def resource_version(self) -> int:
        return self._rv

    def _failing(self) -> int | None:
        with self._fault:
            if self._fail is None:
                return None
            code, until = self._fail
            if time.monotonic() >= until:
                self._fail = None
                return None
            return code

    def _wait_stall(self, conn: _Conn) -> None:
        """Hold a request or a stream while stalled; raise _Closed if the connection goes."""
        with self._fault:
            while time.monotonic() < self._stall_until:
                if conn.closed or self._closing:
                    raise _Closed()
                self._fault.wait(min(0.1, self._stall_until - time.monotonic()))
        if conn.closed:
            raise _Closed()

    def _track(self, sock: socket.socket) -> _Conn | None:
        conn = _Conn(sock)
        with self._lock:
            if self._closing:
                conn.close()
                return None
            self._conns.add(conn)
        return conn

    def _untrack(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    # --- direct access -------------------------------------------------------------------

    def create(self, obj: dict) -> dict:
        res = self._resource_of(obj)
        return copy.deepcopy(self._create(res, copy.deepcopy(obj), None))

    def update(self, obj: dict) -> dict:
        res = self._resource_of(obj)
        return copy.deepcopy(self._update(res, copy.deepcopy(obj), None, subresource=None))

    def update_status(self, obj: dict) -> dict:
        """What PUT .../status does: only the status changes."""
        res = self._resource_of(obj)
        return copy.deepcopy(self._update(res, copy.deepcopy(obj), None, subresource="status"))

    def delete(self, kind: str, namespace: str | None, name: str) -> dict:
        res = _kind(kind)
        return copy.deepcopy(self._delete(res, namespace, name))

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        res = _kind(kind)
        with self._lock:
            obj = self._objects[res].get(self._key(res, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def list(self, kind: str, namespace: str | None = None) -> list[dict]:
        res = _kind(kind)
        with self._lock:
            objs = list(self._objects[res].values())
        if namespace is not None:
            objs = [o for o in objs if o["metadata"].get("namespace") == namespace]
        return [copy.deepcopy(o) for o in sorted(objs, key=_sort_key)]

    def apply_many(self, objs: Iterable[dict]) -> int:
        """Create or replace each object (no resourceVersion check), under one lock; returns
        how many were written. For benchmarks and big fixtures."""
        n = 0
        with self._lock:
            for obj in objs:
                res = self._resource_of(obj)
                obj = copy.deepcopy(obj)
                obj.setdefault("metadata", {}).pop("resourceVersion", None)
                meta = obj["metadata"]
                key = self._key(res, meta.get("namespace") or ("default" if res.namespaced else None), meta.get("name") or "")
                if key in self._objects[res]:
                    self._update(res, obj, None, subresource=None, keep_status=False)
                else:
                    self._create(res, obj, None)
                n += 1
        return n

    # --- the store -----------------------------------------------------------------------

    @staticmethod
    def _resource_of(obj: dict) -> Resource:
        if not isinstance(obj, dict):
            raise ApiError(400, "an object must be a JSON object")
        res = _BY_KIND.get(obj.get("kind"))  # type: ignore[arg-type]
        if res is None or obj.get("apiVersion") != res.api_version:
            raise ApiError(400, f"no resource for apiVersion {obj.get('apiVersion')!r} kind {obj.get('kind')!r}")
        return res

    @staticmethod
    def _key(res: Resource, namespace: str | None, name: str) -> tuple[str, str]:
        return ((namespace or "default") if res.namespaced else "", name)

    def _check_body(self, res: Resource, obj: Any, namespace: str | None) -> dict:
        if not isinstance(obj, dict):
            raise ApiError(400, "the body must be a JSON object")
        kind = obj.get("kind")
        if kind and kind != res.kind:
            raise ApiError(400, f"the kind of the body ({kind}) does not match the resource ({res.kind})")
        if obj.get("apiVersion") and obj["apiVersion"] != res.api_version:
            raise ApiError(400, f"the apiVersion of the body ({obj['apiVersion']}) does not match {res.api_version}")
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "metadata must be an object")
        if res.namespaced:
            ns = meta.get("namespace") or namespace or "default"
            if namespace is not None and ns != namespace:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        for k in ("labels", "annotations"):
            v = meta.get(k)
            if v is not None and (not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values())):
                raise ApiError(400, f"metadata.{k} must map strings to strings")
        obj["apiVersion"], obj["kind"] = res.api_version, res.kind
        return obj

    def _create(self, res: Resource, obj: dict, namespace: str | None, dry_run: bool = False) -> dict:
        obj = self._check_body(res, obj, namespace)
        meta = obj["metadata"]
        if not meta.get("name"):
            if meta.get("generateName"):
                meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
            else:
                raise ApiError(422, f"{res.kind} is invalid: metadata.name: Required value: name or generateName is required")
        for k in ("resourceVersion", "uid", "creationTimestamp", "deletionTimestamp", "managedFields"):
            meta.pop(k, None)
        key = self._key(res, meta.get("namespace"), meta["name"])
        with self._lock:
            if key in self._objects[res]:
                raise ApiError(
                    409, f'{res.plural}{"." + res.group if res.group else ""} "{meta["name"]}" already exists',
                    "AlreadyExists", _details(res, meta["name"]),
                )
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            if res.group == "apps":
                meta["generation"] = 1
            self._default(res, obj, None, dry_run)
            if dry_run:
                return obj
            return self._commit(res, "ADDED", key, obj, None)

    def _update(
        self, res: Resource, obj: dict, namespace: str | None, subresource: str | None,
        dry_run: bool = False, keep_status: bool = True, name: str | None = None,
    ) -> dict:
        obj = self._check_body(res, obj, namespace)
        meta = obj["metadata"]
        if name is not None and meta.get("name") and meta["name"] != name:
            raise ApiError(400, f'the name of the object ({meta["name"]}) does not match the name on the URL ({name})')
        name = meta.get("name") or name
        if not name:
            raise ApiError(422, f"{res.kind} is invalid: metadata.name: Required value")
        meta["name"] = name
        key = self._key(res, meta.get("namespace"), name)
        with self._lock:
            old = self._objects[res].get(key)
            if old is None:
                raise _not_found(res, name)
            given_rv = meta.get("resourceVersion")
            if given_rv and given_rv != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    f'Operation cannot be fulfilled on {res.plural}{"." + res.group if res.group else ""} "{name}": '
                    "the object has been modified; please apply your changes to the latest version and try again",
                    "Conflict", _details(res, name),
                )
            if subresource == "status":
                new = {k: v for k, v in old.items() if k != "status"}
                new["metadata"] = dict(old["metadata"])
                if "status" in obj:
                    new["status"] = obj["status"]
            else:
                new = obj
                for k in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                    if k in old["metadata"]:
                        meta[k] = old["metadata"][k]
                    else:
                        meta.pop(k, None)
                if res.status and keep_status:
                    if "status" in old:
                        new["status"] = old["status"]
                    else:
                        new.pop("status", None)
                if res.group == "apps" and new.get("spec") != old.get("spec"):
                    meta["generation"] = old["metadata"].get("generation", 1) + 1
                self._default(res, new, old, dry_run)
            new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
            if new == old or dry_run:
                # A write that changes nothing is no write: same resourceVersion, no event.
                return new if dry_run else old
            return self._commit(res, "MODIFIED", key, new, old)

    def _delete(self, res: Resource, namespace: str | None, name: str, dry_run: bool = False) -> dict:
        key = self._key(res, namespace, name)
        with self._lock:
            old = self._objects[res].get(key)
            if old is None:
                raise _not_found(res, name)
            if dry_run:
                return old
            gone = {**old, "metadata": dict(old["metadata"])}
            out = self._commit(res, "DELETED", key, gone, old)
            if res.kind == "Service":
                self._allocator.release(f"{key[0]}/{key[1]}")
            if res.kind == "Namespace":
                # The namespace controller's job, done at once.
                for r in RESOURCES:
                    if r.namespaced:
                        for k in [k for k in self._objects[r] if k[0] == name]:
                            self._delete(r, name, k[1])
            return out

    def _default(self, res: Resource, obj: dict, old: dict | None, dry_run: bool) -> None:
        if res.kind == "Namespace":
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
            obj.setdefault("status", {}).setdefault("phase", "Active")
        if res.kind != "Service":
            return
        _default_service(obj)
        spec = obj["spec"]
        if old is not None:
            # As the real server: an update that leaves the ClusterIPs out keeps them.
            ospec = old.get("spec") or {}
            if not spec.get("clusterIP") and not spec.get("clusterIPs") and ospec.get("clusterIPs"):
                spec["clusterIP"], spec["clusterIPs"] = ospec.get("clusterIP"), list(ospec["clusterIPs"])
                for k in ("ipFamilies", "ipFamilyPolicy"):
                    if k in ospec:
                        spec.setdefault(k, ospec[k])
        if spec.get("clusterIPs") == ["None"]:
            spec["clusterIP"] = "None"
        if dry_run:
            _finish_service(spec)
            return
        try:
            alloc = self._allocator.allocate(obj)
        except AllocationError as e:
            raise ApiError(422, f'Service "{obj["metadata"]["name"]}" is invalid: {e}') from None
        obj["spec"] = alloc.obj["spec"]
        _finish_service(obj["spec"])

    def _commit(self, res: Resource, type_: str, key: tuple[str, str], obj: dict, old: dict | None) -> dict:
        """Under the lock: bump the resourceVersion, store, record and fan out; never blocks."""
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)
        if type_ == "DELETED":
            del self._objects[res][key]
        else:
            self._objects[res][key] = obj
        ev = _Event(self._rv, type_, res, obj, old)
        if len(self._history) == self._history.maxlen:
            self._floor = self._history[0].rv
        self._history.append(ev)
        for w in self._watches[res]:
            w.q.put(ev)
        return obj

    # --- HTTP ----------------------------------------------------------------------------

    def _serve(self, h: _Handler) -> None:
        url = urlsplit(h.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        path = url.path.rstrip("/") or "/"
        self.requests.append((h.command, path, query))
        length = h.headers.get("Content-Length")
        try:
            n = int(length) if length else 0
            if n < 0:
                raise ValueError(length)
            body = h.rfile.read(n) if n else b""
        except ValueError:
            h.close_connection = True
            h.reply(400, _status(400, "bad Content-Length"))
            return
        self._wait_stall(h.conn)
        try:
            auth = h.headers.get("Authorization", "")
            given = auth[7:].strip().encode("utf-8", "replace")
            if not auth.startswith("Bearer ") or not secrets.compare_digest(given, self.token.encode()):
                raise ApiError(401, "Unauthorized")
            code = self._failing()
            if code is not None:
                raise ApiError(code, f"injected failure ({code})")
            self._route(h, path, query, body)
        except ApiError as e:
            log.debug("apiserver.error method=%s path=%s code=%d message=%s", h.command, path, e.code, e.message)
            h.reply(e.code, e.status())
        except _Closed:
            raise
        except (OSError, ssl.SSLError):
            raise _Closed() from None
        except Exception as e:  # a bug here must answer 500, never kill the connection thread
            log.exception("apiserver.internal_error method=%s path=%s", h.command, path)
            h.reply(500, _status(500, f"internal error: {e}"))

    def _route(self, h: _Handler, path: str, query: dict, body: bytes) -> None:
        parts = [p for p in path.split("/") if p]
        method = h.command
        if path == "/version":
            major, minor = self.version
            return h.reply(200, {
                "major": str(major), "minor": str(minor), "gitVersion": f"v{major}.{minor}.0",
                "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64",
            })
        if path in ("/healthz", "/readyz", "/livez"):
            return h.reply(200, b"ok", "text/plain")
        if path == "/api":
            return h.reply(200, {
                "kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": f"{self.host}:{self._port}"}],
            })
        if path == "/apis":
            return h.reply(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": _groups()})
        if path == "/openapi/v3":
            return h.reply(200, {"paths": {
                _gv_path(gv): {"serverRelativeURL": f"/openapi/v3/{_gv_path(gv)}?hash={_OPENAPI_HASH}"}
                for gv in _GROUP_VERSIONS
            }})
        if path == "/openapi/v2":
            if "protobuf" in h.headers.get("Accept", ""):
                return h.reply(200, _openapi_v2_protobuf(), _OPENAPI_V2_PB)
            return h.reply(200, _openapi_v2_json())
        if path.startswith("/openapi/v3/"):
            gv = next((gv for gv in _GROUP_VERSIONS if path == f"/openapi/v3/{_gv_path(gv)}"), None)
            if gv is None:
                raise ApiError(404, "the server could not find the requested resource")
            return h.reply(200, _openapi_v3(gv))
        if parts and parts[0] == "api" and len(parts) >= 2:
            gv, rest = ("", parts[1]), parts[2:]
        elif parts and parts[0] == "apis" and len(parts) >= 3:
            gv, rest = (parts[1], parts[2]), parts[3:]
        elif parts and parts[0] == "apis" and len(parts) == 2:
            g = next((x for x in _groups() if x["name"] == parts[1]), None)
            if g is None:
                raise ApiError(404, "the server could not find the requested resource")
            return h.reply(200, {"kind": "APIGroup", "apiVersion": "v1", **g})
        else:
            raise ApiError(404, "the server could not find the requested resource")
        if gv not in _GROUP_VERSIONS:
            raise ApiError(404, "the server could not find the requested resource")
        if not rest:
            if method != "GET":
                raise ApiError(405, f"{method} is not supported on discovery")
            return h.reply(200, _resource_list(gv))
        namespace: str | None = None
        if len(rest) >= 3 and rest[0] == "namespaces" and (gv[0], gv[1], rest[2]) in _BY_PATH:
            namespace, rest = rest[1], rest[2:]
        res = _BY_PATH.get((gv[0], gv[1], rest[0]))
        if res is None or len(rest) > 3 or (namespace is not None and not res.namespaced):
            raise ApiError(404, "the server could not find the requested resource")
        name = rest[1] if len(rest) >= 2 else None
        sub = rest[2] if len(rest) == 3 else None
        if sub is not None and (sub != "status" or not res.status):
            raise ApiError(404, "the server could not find the requested resource")
        if res.namespaced and name is not None and namespace is None:
            raise ApiError(404, "the server could not find the requested resource")
        dry = query.get("dryRun") == "All"
        if name is None:
            if method == "GET":
                if query.get("watch", "").lower() in ("true", "1"):
                    return self._watch(h, res, namespace, query)
                out = self._list(res, namespace, query)
                if _wants_table(h):
                    out = _table(res, out["items"], out["metadata"], query)
                return h.reply(200, out)
            if method == "POST":
                obj = self._create(res, _json(body), namespace, dry)
                return h.reply(201, obj)
            if method == "DELETE":
                return h.reply(200, self._delete_collection(res, namespace, query, dry))
            raise ApiError(405, f"{method} is not allowed on a collection of {res.plural}")
        if method == "GET":
            if query.get("watch", "").lower() in ("true", "1"):
                return self._watch(h, res, namespace, {**query, "fieldSelector": f"metadata.name={name}"})
            with self._lock:
                obj = self._objects[res].get(self._key(res, namespace, name))
            if obj is None:
                raise _not_found(res, name)
            return h.reply(200, _table(res, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}, query)
                           if _wants_table(h) else obj)
        if method == "PUT":
            return h.reply(200, self._update(res, _json(body), namespace, sub, dry, name=name))
        if method == "PATCH":
            return h.reply(200, self._patch(res, namespace, name, sub, h.headers.get("Content-Type", ""), body, dry))
        if method == "DELETE" and sub is None:
            if body:
                _json(body)  # DeleteOptions: read for validity, not honoured
            return h.reply(200, self._delete(res, namespace, name, dry))
        raise ApiError(405, f"{method} is not allowed on {res.plural}{'/' + sub if sub else ''}")

    def _patch(self, res: Resource, namespace: str | None, name: str, sub: str | None, ctype: str, body: bytes, dry: bool) -> dict:
        ctype = ctype.split(";")[0].strip()
        patch = _json(body, any_type=True)
        with self._lock:
            cur = self._objects[res].get(self._key(res, namespace, name))
            if cur is None:
                raise _not_found(res, name)
            cur = copy.deepcopy(cur)
            try:
                if ctype == "application/merge-patch+json":
                    new = json_merge_patch(cur, patch)
                elif ctype == "application/json-patch+json":
                    new = json_patch(cur, patch)
                elif ctype == "application/strategic-merge-patch+json":
                    new = strategic_merge_patch(res.kind, cur, patch)
                else:
                    raise ApiError(415, f"the body of the request was in an unknown format - accepted media types include: "
                                        "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json")
            except (ValueError, TypeError, KeyError, IndexError) as e:
                raise ApiError(422, f"the patch could not be applied: {e}") from None
            if not isinstance(new, dict):
                raise ApiError(422, "the patch does not leave an object")
            return self._update(res, new, namespace, sub, dry, name=name)

    def _delete_collection(self, res: Resource, namespace: str | None, query: dict, dry: bool) -> dict:
        flt = _Filter(namespace, parse_label_selector(query.get("labelSelector", "")), parse_field_selector(query.get("fieldSelector", ""), res))
        with self._lock:
            victims = [o for o in self._objects[res].values() if flt.match(o)]
            items = [self._delete(res, o["metadata"].get("namespace"), o["metadata"]["name"], dry) for o in victims]
            rv = self._rv
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": {"resourceVersion": str(rv)},
                "items": [_item(o) for o in items]}

    def _list(self, res: Resource, namespace: str | None, query: dict) -> dict:
        limit = query.get("limit")
        try:
            limit_n = int(limit) if limit else 0
        except ValueError:
            raise ApiError(400, f"limit must be a number, got {limit!r}") from None
        token = query.get("continue")
        if token:
            try:
                state = json.loads(base64.urlsafe_b64decode(token.encode() + b"=="))
                snap_id, offset = state["id"], int(state["offset"])
            except (ValueError, KeyError, TypeError):
                raise ApiError(400, "continue key is not valid") from None
            with self._lock:
                snap = self._snapshots.get(snap_id)
                if snap is None or snap[0] < self._floor:
                    raise ApiError(
                        410, "The provided continue parameter is too old to display a consistent list result. "
                             "You can start a new list without the continue parameter.",
                        "Expired",
                    )
            rv, items = snap
        else:
            flt = _Filter(namespace, parse_label_selector(query.get("labelSelector", "")),
                          parse_field_selector(query.get("fieldSelector", ""), res))
            with self._lock:
                rv = self._rv
                objs = list(self._objects[res].values())
            items = sorted((o for o in objs if flt.match(o)), key=_sort_key)
            offset, snap_id = 0, None
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        page = items[offset:]
        if limit_n > 0 and len(page) > limit_n:
            page = page[:limit_n]
            if snap_id is None:
                snap_id = secrets.token_hex(8)
                with self._lock:
                    self._snapshots[snap_id] = (rv, items)
                    while len(self._snapshots) > SNAPSHOTS:
                        self._snapshots.popitem(last=False)
            nxt = {"id": snap_id, "offset": offset + limit_n, "rv": rv}
            meta["continue"] = base64.urlsafe_b64encode(json.dumps(nxt).encode()).decode().rstrip("=")
            meta["remainingItemCount"] = len(items) - offset - limit_n
        return {"kind": f"{res.kind}List", "apiVersion": res.api_version, "metadata": meta, "items": [_item(o) for o in page]}

    # --- watch ---------------------------------------------------------------------------

    def _watch(self, h: _Handler, res: Resource, namespace: str | None, query: dict) -> None:
        flt = _Filter(namespace, parse_label_selector(query.get("labelSelector", "")),
                      parse_field_selector(query.get("fieldSelector", ""), res))
        rv_text = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        # The watch-list protocol: current objects as ADDED, then a bookmark marking their end.
        initial_events = query.get("sendInitialEvents", "").lower() in ("true", "1")
        timeout = query.get("timeoutSeconds")
        try:
            since = int(rv_text) if rv_text not in ("", "0") and not initial_events else None
            deadline = time.monotonic() + float(timeout) if timeout else float("inf")
        except ValueError:
            raise ApiError(400, f"invalid resourceVersion {rv_text!r} or timeoutSeconds {timeout!r}") from None
        w = _Watch(res, flt, h.conn)
        initial: list[dict] = []
        too_old = False
        with self._lock:
            if since is None:
                for o in sorted(self._objects[res].values(), key=_sort_key):
                    if flt.match(o):
                        initial.append(o)
                w.last_rv = self._rv
            elif since < self._floor:
                too_old = True
            else:
                for ev in self._history:
                    if ev.rv > since and ev.res is res:
                        w.q.put(ev)
                w.last_rv = since
            if not too_old:
                self._watches[res].add(w)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Cache-Control", "no-cache, private")
        h.end_headers()
        h.close_connection = True
        log.debug("apiserver.watch_open resource=%s namespace=%s since=%s", res.plural, namespace, rv_text)

        table = _wants_table(h)

        def encode(type_: str, obj: dict, line: bytes | None = None) -> bytes:
            # kubectl get -w asks for Tables in the stream too.
            if table:
                return _dumps({"type": type_, "object": _table(res, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]}, query)}) + b"\n"
            return line or _dumps({"type": type_, "object": obj}) + b"\n"

        def bookmark(annotations: dict | None = None) -> bytes:
            meta: dict[str, Any] = {"resourceVersion": str(w.last_rv)}
            if annotations:
                meta["annotations"] = annotations
            return _dumps({"type": "BOOKMARK", "object": {"kind": res.kind, "apiVersion": res.api_version, "metadata": meta}}) + b"\n"

        def send(data: bytes) -> None:
            self._wait_stall(h.conn)
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        try:
            if too_old:
                msg = f"too old resource version: {since} ({self._floor})"
                send(_dumps({"type": "ERROR", "object": _status(410, msg, "Expired")}) + b"\n")
                h.wfile.write(b"0\r\n\r\n")
                return
            for obj in initial:
                send(encode("ADDED", obj))
            if initial_events and bookmarks:
                send(bookmark({"k8s.io/initial-events-end": "true"}))
            next_bookmark = time.monotonic() + self.bookmark_interval
            while not w.dropped and not self._closing:
                now = time.monotonic()
                if now >= deadline:
                    break
                wait = deadline - now
                if bookmarks:
                    wait = min(wait, max(0.0, next_bookmark - now))
                try:
                    ev = w.q.get(timeout=min(wait, 0.5))
                except queue.Empty:
                    ev = None
                if ev is not None:
                    w.last_rv = ev.rv
                    out = self._event_for(w, ev)
                    if out is not None:
                        send(encode(*out))
                    continue
                if bookmarks and time.monotonic() >= next_bookmark:
                    with self._lock:
                        # Only with nothing queued is every event up to now delivered.
                        if w.q.empty():
                            w.last_rv = self._rv
                    send(bookmark())
                    next_bookmark = time.monotonic() + self.bookmark_interval
                if h.conn.closed:
                    break
            if not w.dropped and not h.conn.closed:
                self._wait_stall(h.conn)
                # Unregister before the last chunk: a client that has read the end of the
                # stream must find the watch closed (open_watches), not race this thread.
                with self._lock:
                    self._watches[res].discard(w)
                h.wfile.write(b"0\r\n\r\n")
                h.wfile.flush()
        except (OSError, ssl.SSLError, _Closed):
            pass
        finally:
            with self._lock:
                self._watches[res].discard(w)
            log.debug("apiserver.watch_closed resource=%s dropped=%s", res.plural, w.dropped)
        if w.dropped:
            raise _Closed()

    @staticmethod
    def _event_for(w: _Watch, ev: _Event) -> tuple[str, dict, bytes | None] | None:
        """What this watcher sees of an event: (type, object, the shared encoding if it fits)."""
        flt = w.filter
        if ev.type == "ADDED":
            return (ev.type, ev.obj, ev.line()) if flt.match(ev.obj) else None
        if ev.type == "DELETED":
            return (ev.type, ev.obj, ev.line()) if flt.match(ev.old) else None
        was, now = flt.match(ev.old), flt.match(ev.obj)
        if was and now:
            return (ev.type, ev.obj, ev.line())
        if now:
            return ("ADDED", ev.obj, None)
        if was:
            # Leaving the selector reads as a deletion: the old content at the new version.
            gone = {**ev.old, "metadata": {**ev.old["metadata"], "resourceVersion": str(ev.rv)}}  # type: ignore[index]
            return ("DELETED", gone, None)
        return None


def _trustme() -> Any:
    try:
        import trustme
    except ImportError as e:  # pragma: no cover - the test extra installs it
        raise RuntimeError("kpr.testing.apiserver needs trustme: pip install 'kpr[test]'") from e
    return trustme


def _kind(kind: str) -> Resource:
    res = _BY_KIND.get(kind)
    if res is None:
        raise ApiError(400, f"unknown kind {kind!r}")
    return res


def _sort_key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace") or "", meta["name"])


def _item(obj: dict) -> dict:
    # Items of a real list carry no kind or apiVersion.
    return {k: v for k, v in obj.items() if k != "kind" and k != "apiVersion"}


def _json(body: bytes, any_type: bool = False) -> Any:
    try:
        value = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON: {e}") from None
    if not any_type and not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    if value is None:
        raise ApiError(400, "the body is empty")
    return value


def _groups() -> list[dict]:
    out: dict[str, dict] = {}
    for group, version in _GROUP_VERSIONS:
        if not group:
            continue
        gv = {"groupVersion": f"{group}/{version}", "version": version}
        g = out.setdefault(group, {"name": group, "versions": [], "preferredVersion": gv})
        g["versions"].append(gv)
    return list(out.values())


# The OpenAPI v3 documents only say which PATCH operations take fieldValidation: kubectl
# then leaves validation to the server (which accepts what it can store) and, finding no
# schemas, computes strategic merge patches from the types compiled into it. Without them it
# wants /openapi/v2 for client-side validation and fails.
_OPENAPI_HASH = "kpr0"


def _gv_path(gv: tuple[str, str]) -> str:
    return f"apis/{gv[0]}/{gv[1]}" if gv[0] else f"api/{gv[1]}"


def _openapi_v3(gv: tuple[str, str]) -> dict:
    paths = {}
    for path, r in _patch_paths():
        if r.group_version != gv:
            continue
        paths[path] = {"patch": {
            "operationId": f"patch{r.kind}",
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
            "parameters": [{"name": p, "in": "query", "schema": {"type": "string", "uniqueItems": True}}
                           for p in _PATCH_PARAMS],
            "responses": {"200": {"description": "OK"}},
        }}
    return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v%d.%d.0" % SERVER_VERSION}, "paths": paths}


# kubectl 1.27 reads OpenAPI v2 instead, and only as protobuf (gnostic's openapi_v2.Document).
# The same content, encoded by hand: the few fields it reads are all strings and messages.
_OPENAPI_V2_PB = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf"
_PATCH_PARAMS = ("dryRun", "fieldManager", "fieldValidation", "force")


def _pb(field: int, value: str | bytes) -> bytes:
    """A length-delimited protobuf field."""
    data = value.encode() if isinstance(value, str) else value

    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            b, n = n & 0x7F, n >> 7
            out.append(b | (0x80 if n else 0))
            if not n:
                return bytes(out)

    return varint(field << 3 | 2) + varint(len(data)) + data


def _patch_paths() -> list[tuple[str, Resource]]:
    out = []
    for r in RESOURCES:
        scope = "namespaces/{namespace}/" if r.namespaced else ""
        out.append((f"/{_gv_path(r.group_version)}/{scope}{r.plural}/{{name}}", r))
    return out


def _openapi_v2_protobuf() -> bytes:
    # Document{swagger=1, info=2{title=1, version=2}, paths=8{path=2 NamedPathItem{name=1,
    # value=2 PathItem{patch=8 Operation{operation_id=5, parameters=8 ParametersItem{
    # parameter=1 Parameter{non_body_parameter=2 NonBodyParameter{query_parameter_sub_schema=3
    # {in=2, name=4, type=6}}}}, vendor_extension=13 NamedAny{name=1, value=2 Any{yaml=2}}}}}}}
    paths = b""
    for path, r in _patch_paths():
        gvk = yaml.safe_dump({"group": r.group, "kind": r.kind, "version": r.version})
        op = _pb(5, f"patch{r.kind}")
        for p in _PATCH_PARAMS:
            op += _pb(8, _pb(1, _pb(2, _pb(3, _pb(2, "query") + _pb(4, p) + _pb(6, "string")))))
        op += _pb(13, _pb(1, "x-kubernetes-group-version-kind") + _pb(2, _pb(2, gvk)))
        paths += _pb(2, _pb(1, path) + _pb(2, _pb(8, op)))
    return _pb(1, "2.0") + _pb(2, _pb(1, "Kubernetes") + _pb(2, "v%d.%d.0" % SERVER_VERSION)) + _pb(8, paths)


def _openapi_v2_json() -> dict:
    return {"swagger": "2.0", "info": {"title": "Kubernetes", "version": "v%d.%d.0" % SERVER_VERSION}, "paths": {
        path: {"patch": {
            "operationId": f"patch{r.kind}",
            "parameters": [{"name": p, "in": "query", "type": "string", "uniqueItems": True} for p in _PATCH_PARAMS],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-action": "patch",
            "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
        }} for path, r in _patch_paths()
    }}


# --- Tables (kubectl get asks for them) ----------------------------------------------------


def _wants_table(h: _Handler) -> bool:
    return "as=Table" in h.headers.get("Accept", "")


def _age(obj: dict) -> str:
    try:
        t = datetime.datetime.strptime(obj["metadata"]["creationTimestamp"], "%Y-%m-%dT%H:%M:%SZ")
    except (KeyError, ValueError, TypeError):
        return "<unknown>"
    s = int((datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - t).total_seconds())
    if s < 120:
        return f"{max(s, 0)}s"
    if s < 600:
        return f"{s // 60}m{s % 60}s" if s % 60 else f"{s // 60}m"
    if s < 3 * 3600:
        return f"{s // 60}m"
    if s < 48 * 3600:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def _get(obj: dict, *path: str, default: Any = None) -> Any:
    for p in path:
        obj = obj.get(p) if isinstance(obj, dict) else None  # type: ignore[assignment]
    return default if obj is None else obj


def _svc_external(o: dict) -> str:
    spec = o.get("spec") or {}
    if spec.get("type") == "ExternalName":
        return spec.get("externalName") or "<none>"
    ips = list(spec.get("externalIPs") or [])
    if spec.get("type") == "LoadBalancer":
        lb = [i.get("ip") or i.get("hostname") for i in _get(o, "status", "loadBalancer", "ingress", default=[])]
        ips = [i for i in lb if i] + ips
        return ",".join(ips) or "<pending>"
    return ",".join(ips) or "<none>"


def _svc_ports(o: dict) -> str:
    out = []
    for p in _get(o, "spec", "ports", default=[]):
        np = f":{p['nodePort']}" if p.get("nodePort") else ""
        out.append(f"{p.get('port')}{np}/{p.get('protocol', 'TCP')}")
    return ",".join(out) or "<none>"


def _slice_endpoints(o: dict) -> str:
    addrs = [a for e in o.get("endpoints") or [] for a in e.get("addresses") or []]
    more = f" + {len(addrs) - 3} more..." if len(addrs) > 3 else ""
    return ",".join(addrs[:3]) + more if addrs else "<unset>"


def _node_ready(o: dict) -> str:
    cond = next((c for c in _get(o, "status", "conditions", default=[]) if c.get("type") == "Ready"), None)
    return "Ready" if cond and cond.get("status") == "True" else "NotReady" if cond else "Unknown"


def _pod_ready(o: dict) -> str:
    statuses = _get(o, "status", "containerStatuses", default=[])
    return f"{sum(1 for c in statuses if c.get('ready'))}/{len(_get(o, 'spec', 'containers', default=[]))}"


# (column, type, priority, cell); priority 1 shows with -o wide. Kinds not listed get Name, Age.
_Col = tuple[str, str, int, Any]
_COLUMNS: dict[str, list[_Col]] = {
    "Service": [
        ("Type", "string", 0, lambda o: _get(o, "spec", "type", default="ClusterIP")),
        ("Cluster-IP", "string", 0, lambda o: _get(o, "spec", "clusterIP", default="<none>")),
        ("External-IP", "string", 0, _svc_external),
        ("Port(s)", "string", 0, _svc_ports),
        ("Selector", "string", 1, lambda o: ",".join(f"{k}={v}" for k, v in _get(o, "spec", "selector", default={}).items()) or "<none>"),
    ],
    "EndpointSlice": [
        ("AddressType", "string", 0, lambda o: o.get("addressType", "")),
        ("Ports", "string", 0, lambda o: ",".join(str(p.get("port")) for p in o.get("ports") or []) or "<unset>"),
        ("Endpoints", "string", 0, _slice_endpoints),
    ],
    "Endpoints": [
        ("Endpoints", "string", 0, lambda o: ",".join(
            f"{a.get('ip')}:{p.get('port')}" for s in o.get("subsets") or [] for a in s.get("addresses") or []
            for p in s.get("ports") or [{}]) or "<none>"),
    ],
    "Namespace": [("Status", "string", 0, lambda o: _get(o, "status", "phase", default="Active"))],
    "Node": [
        ("Status", "string", 0, _node_ready),
        ("Version", "string", 0, lambda o: _get(o, "status", "nodeInfo", "kubeletVersion", default="")),
    ],
    "Pod": [
        ("Ready", "string", 0, _pod_ready),
        ("Status", "string", 0, lambda o: _get(o, "status", "phase", default="Pending")),
        ("IP", "string", 1, lambda o: _get(o, "status", "podIP", default="<none>")),
        ("Node", "string", 1, lambda o: _get(o, "spec", "nodeName", default="<none>")),
    ],
    "DaemonSet": [
        ("Desired", "integer", 0, lambda o: _get(o, "status", "desiredNumberScheduled", default=0)),
        ("Current", "integer", 0, lambda o: _get(o, "status", "currentNumberScheduled", default=0)),
        ("Ready", "integer", 0, lambda o: _get(o, "status", "numberReady", default=0)),
        ("Available", "integer", 0, lambda o: _get(o, "status", "numberAvailable", default=0)),
    ],
    "Deployment": [
        ("Ready", "string", 0, lambda o: f"{_get(o, 'status', 'readyReplicas', default=0)}/{_get(o, 'spec', 'replicas', default=1)}"),
        ("Available", "integer", 0, lambda o: _get(o, "status", "availableReplicas", default=0)),
    ],
    "ConfigMap": [("Data", "integer", 0, lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}))],
    "Secret": [
        ("Type", "string", 0, lambda o: o.get("type", "Opaque")),
        ("Data", "integer", 0, lambda o: len(o.get("data") or {})),
    ],
    "Lease": [("Holder", "string", 0, lambda o: _get(o, "spec", "holderIdentity", default=""))],
}


def _table(res: Resource, objs: list[dict], meta: dict, query: dict) -> dict:
    """The meta.k8s.io/v1 Table the real server answers kubectl with: its columns for the
    common kinds, Name and Age for the rest."""
    cols: list[_Col] = [("Name", "string", 0, lambda o: o["metadata"]["name"]), *_COLUMNS.get(res.kind, []),
                        ("Age", "string", 0, _age)]
    # Age sits before the wide-only columns, as in kubectl's own output.
    cols = [c for c in cols if c[2] == 0] + [c for c in cols if c[2] > 0]
    include = query.get("includeObject", "Metadata")

    def row_object(o: dict) -> dict | None:
        if include == "Object":
            return {"kind": res.kind, "apiVersion": res.api_version, **o}
        if include == "None":
            return None
        return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}

    return {
        "kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta,
        "columnDefinitions": [
            {"name": n, "type": t, "format": "name" if n == "Name" else "", "description": n, "priority": p}
            for n, t, p, _ in cols
        ],
        "rows": [{"cells": [f(o) for *_, f in cols], "object": row_object(o)} for o in objs],
    }


def _resource_list(gv: tuple[str, str]) -> dict:
    resources = []
    for r in RESOURCES:
        if r.group_version != gv:
            continue
        entry = {"name": r.plural, "singularName": r.singular, "namespaced": r.namespaced, "kind": r.kind, "verbs": _VERBS}
        if r.short:
            entry["shortNames"] = list(r.short)
        if r.all:
            entry["categories"] = ["all"]
        resources.append(entry)
        if r.status:
            resources.append({"name": f"{r.plural}/status", "singularName": "", "namespaced": r.namespaced,
                              "kind": r.kind, "verbs": _STATUS_VERBS})
    group, version = gv
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}
