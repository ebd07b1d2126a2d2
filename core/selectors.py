"""Kubernetes label selectors (metav1.LabelSelector): matching, and the config model.

Plugins that pick services by label (announce_bgp's advertisements, lb_ipam's pools) take a
``serviceSelector`` of the shape ``LabelSelectorConfig`` validates, and match it through
``LabelSelectorConfig.selector()``, compiled once, not per service.

matchLabels and matchExpressions are ANDed; an empty selector matches every set of labels,
as it does for a Deployment or a NetworkPolicy. Operators follow apimachinery's
``labels.Selector``: ``In`` needs the key present with one of the values, ``NotIn`` matches
when the key is absent or its value is not listed, ``Exists`` and ``DoesNotExist`` look at
the key only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import field_validator, model_validator

from kpr.config import Section

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")

# apimachinery's qualified name: optional DNS-subdomain prefix, then a 1-63 character name.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_PREFIX = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY_RE = re.compile(rf"^({_PREFIX}/)?{_NAME}$")
_VALUE_RE = re.compile(rf"^({_NAME})?$")


def check_key(key: str) -> str:
    prefix, _, _ = key.rpartition("/")
    if not _KEY_RE.match(key) or len(prefix) > 253:
        raise ValueError(f"not a valid label key: {key!r}")
    return key


def check_value(value: str) -> str:
    if len(value) > 63 or not _VALUE_RE.match(value):
        raise ValueError(f"not a valid label value: {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str
    values: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"operator must be one of {', '.join(OPERATORS)}, got {self.operator!r}")
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")

    def matches(self, labels: Mapping[str, str]) -> bool:
        op = self.operator
        if op == "Exists":
            return self.key in labels
        if op == "DoesNotExist":
            return self.key not in labels
        if op == "In":
            return self.key in labels and labels[self.key] in self.values
        return self.key not in labels or labels[self.key] not in self.values


@dataclass(frozen=True, slots=True)
class Selector:
    match_labels: tuple[tuple[str, str], ...] = ()
    requirements: tuple[Requirement, ...] = ()

    @classmethod
    def build(cls, match_labels: Mapping[str, str] | None = None, expressions: Sequence[tuple[str, str, Sequence[str]]] = ()) -> "Selector":
        reqs = tuple(Requirement(k, op, frozenset(vals)) for k, op, vals in expressions)
        return cls(tuple(sorted((match_labels or {}).items())), reqs)

    @property
    def empty(self) -> bool:
        return not self.match_labels and not self.requirements

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.match_labels:
            if labels.get(key) != value:
                return False
        return all(r.matches(labels) for r in self.requirements)


EVERYTHING = Selector()


class SelectorRequirementConfig(Section):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = []

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        return check_key(v)

    @field_validator("values")
    @classmethod
    def _values(cls, v: list[str]) -> list[str]:
        return [check_value(x) for x in v]

    @model_validator(mode="after")
    def _arity(self) -> "SelectorRequirementConfig":
        Requirement(self.key, self.operator, frozenset(self.values))  # raises with the reason
        return self


class LabelSelectorConfig(Section):
    """A Kubernetes label selector; empty matches every service."""

    match_labels: dict[str, str] = {}
    match_expressions: list[SelectorRequirementConfig] = []

    @field_validator("match_labels")
    @classmethod
    def _labels(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            check_key(key)
            check_value(value)
        return v

    def selector(self) -> Selector:
        return Selector.build(self.match_labels, [(e.key, e.operator, e.values) for e in self.match_expressions])
