"""YAML manifests read faster: libyaml's parser, and documents built from its nodes by a
plain walk instead of PyYAML's constructor.

PyYAML's safe constructor is Python code written for every YAML feature (merge keys, sets,
recursive anchors, generators for deferred construction); for the plain maps, lists and
scalars manifests are made of it took two thirds of reading a YAML manifests directory
(about 5 s of 7 at 20k services). `FastSafeLoader` builds those itself and leaves anything
else to PyYAML: a node with a tag other than map, seq or a scalar PyYAML's safe loader knows,
a merge key (`<<`), a key that cannot be hashed, a recursive anchor or a document deeper than
MAX_DEPTH hands the whole document back to SafeConstructor, which builds it (or refuses it,
with its own error) exactly as before. What comes out is what yaml.safe_load_all gives:
scalars through the same constructors (ints, floats, bools, nulls, timestamps, binary), an
alias as the same object as its anchor (so an alias bomb costs no more than its nodes; the
files source's size bound still expands it), the last of duplicate keys. Mapping keys are
interned on the way (memory.compact would do it after). libyaml's composer also calls back
into Python for every node to resolve its tag and follow path resolvers; those calls are
answered as BaseResolver answers them without path resolvers, plain scalars' tags from a
bounded cache. Together: 2.2x faster than yaml.CSafeLoader on a file of 100 services.
"""

from __future__ import annotations

import operator
from sys import intern
from typing import Any

import yaml
from yaml.nodes import MappingNode, ScalarNode, SequenceNode

_Base: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_STR = "tag:yaml.org,2002:str"
_SEQ = "tag:yaml.org,2002:seq"
_MAP = "tag:yaml.org,2002:map"
# The scalars SafeConstructor builds by a plain call (not a generator).
_SCALAR_TAGS = frozenset(
    f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "binary", "timestamp")
)
# Keys SafeConstructor.flatten_mapping rewrites: merge (<<) and value (=).
_SPECIAL_KEYS = frozenset({"tag:yaml.org,2002:merge", "tag:yaml.org,2002:value"})
# Deeper documents go to PyYAML, whose constructor does not recurse (the files source then
# refuses them for their depth anyway).
MAX_DEPTH = 100


# Plain scalars' implicit tags (FastSafeLoader's resolvers are SafeLoader's, fixed): bounded,
# as unique values (addresses, names) pass through too.
_tags: dict[str, str] = {}
_TAGS_MAX = 65536


class _Slow(Exception):
    """This document needs PyYAML's constructor."""


class FastSafeLoader(_Base):  # type: ignore[misc, valid-type]
    """yaml.CSafeLoader (SafeLoader without libyaml) with a fast path for plain documents."""

    # libyaml's composer calls these two for every node, to follow path resolvers: kpr adds
    # none (a test checks), so they do nothing, as BaseResolver's do then, but as C builtins
    # instead of Python calls (about 5% of reading YAML).
    descend_resolver = staticmethod(operator.is_)  # (node, index) -> ignored
    ascend_resolver = staticmethod(tuple)  # () -> ignored

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        # Called by libyaml's composer for every node whose tag is not written: what
        # BaseResolver.resolve answers without path resolvers, with the answers for plain
        # scalars kept (keys, protocols, flags, ports repeat across a file).
        if kind is ScalarNode:
            if not implicit[0]:
                return self.DEFAULT_SCALAR_TAG
            tag = _tags.get(value)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(_tags) >= _TAGS_MAX:
                    _tags.clear()
                _tags[value] = tag
            return tag
        if kind is SequenceNode:
            return self.DEFAULT_SEQUENCE_TAG
        return self.DEFAULT_MAPPING_TAG

    def construct_document(self, node: Any) -> Any:
        try:
            return _Builder(self).build(node, 0)
        except Exception:
            # _Slow, or anything a scalar's constructor raised: PyYAML's constructor builds
            # the document, or raises the error it always raised.
            pass
        return super().construct_document(node)


class _Builder:
    __slots__ = ("loader", "scalars", "done", "busy")

    def __init__(self, loader: Any):
        self.loader = loader
        self.scalars = loader.yaml_constructors
        # Collections built so far, by node: an alias is the same node, and gets the same object.
        self.done: dict[int, Any] = {}
        self.busy: set[int] = set()

    def build(self, node: Any, depth: int) -> Any:
        cls = node.__class__
        if cls is ScalarNode:
            tag = node.tag
            if tag == _STR:
                return node.value
            if tag not in _SCALAR_TAGS:
                # A collection's tag on a scalar (!!map, !!set, !!omap: PyYAML's error; their
                # constructors are generators), or a tag PyYAML does not know.
                raise _Slow
            return self.scalars[tag](self.loader, node)
        key = id(node)
        built = self.done.get(key)
        if built is not None:
            return built
        if key in self.busy or depth >= MAX_DEPTH:
            raise _Slow
        self.busy.add(key)
        below = depth + 1
        if cls is MappingNode and node.tag == _MAP:
            out: Any = {}
            for key_node, value_node in node.value:
                if key_node.tag in _SPECIAL_KEYS:
                    raise _Slow
                if key_node.__class__ is ScalarNode and key_node.tag == _STR:
                    name = intern(key_node.value)
                else:
                    name = self.build(key_node, below)
                    hash(name)  # TypeError (to _Slow) for a key PyYAML refuses
                out[name] = self.build(value_node, below)
        elif cls is SequenceNode and node.tag == _SEQ:
            build = self.build
            out = [build(item, below) for item in node.value]
        else:
            raise _Slow
        self.busy.discard(key)
        self.done[key] = out
        return out
