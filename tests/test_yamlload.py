"""FastSafeLoader gives what yaml.safe_load_all gives (or PyYAML's own error) for every
kind of YAML document, and takes its fast path for plain manifests."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import yaml

from kpr.sources import yamlload
from kpr.sources.yamlload import FastSafeLoader

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from bench_files_source import manifests  # noqa: E402

Reference = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load(text: str, loader) -> object:
    try:
        return ("ok", list(yaml.load_all(text, Loader=loader)))
    except Exception as e:  # the same error, type and text
        return ("error", type(e).__name__, str(e))


def same(a: object, b: object, seen: set | None = None) -> bool:
    """Equal, with NaN equal to itself, recursive documents included."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, (dict, list, tuple)):
        seen = set() if seen is None else seen
        if (id(a), id(b)) in seen:
            return True
        seen.add((id(a), id(b)))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], seen) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y, seen) for x, y in zip(a, b))
    return a == b


DOCS = {
    "manifests": yaml.safe_dump_all([d for i in range(30) for d in manifests(i, 10)], sort_keys=False),
    "scalars": "a: 1\nb: 0x1f\nc: 0o17\nd: 1_000\ne: 1:30\nf: 1.5\ng: .inf\nh: -.inf\ni: .nan\nj: yes\nk: off\n"
    "l: ~\nm: null\nn: ''\no: 2024-01-02\np: 2024-01-02T03:04:05Z\nq: !!str 123\nr: !!int '5'\ns: !!float '1'\n"
    "t: !!binary aGVsbG8=\nu: !!bool 'true'\nv: 12e3\nw: '0x1f'\nx: -0\n",
    "keys": "1: int\n1.5: float\ntrue: bool\n~: none\n2024-01-02: date\n",
    "anchors": "base: &b {x: 1, y: [1, 2]}\nuse: *b\nlist: &l [a, b]\nagain: [*l, *l]\n",
    "merge": "base: &b {x: 1, y: 2}\nchild:\n  <<: *b\n  y: 3\n",
    "merge list": "a: &a {x: 1}\nb: &b {y: 2}\nc: {<<: [*a, *b], z: 3}\n",
    "value key": "=: v\nk: 1\n",
    "set": "s: !!set {a, b}\n",
    "omap": "o: !!omap [a: 1, b: 2]\n",
    "pairs": "p: !!pairs [a: 1, a: 2]\n",
    "custom tag": "x: !foo bar\n",
    "custom tag on map": "x: !foo {a: 1}\n",
    "map tag on scalar": "x: !!map abc\n",
    "omap tag on scalar": "x: !!omap abc\n",
    "set tag on scalar": "x: !!set abc\n",
    "pairs tag on scalar": "x: !!pairs abc\n",
    "seq tag on scalar": "x: !!seq abc\n",
    "str tag on map": "x: !!str {a: 1}\n",
    "int tag on list": "x: !!int [1]\n",
    "null tag": "x: !!null ''\n",
    "unhashable key": "? [a, b]\n: c\n",
    "map key": "? {a: 1}\n: c\n",
    "recursive": "a: &a [1, *a]\n",
    "recursive map": "&m {self: *m}\n",
    "duplicate keys": "a: 1\na: 2\nb: 3\n",
    "multi docs": "a: 1\n---\n- 1\n- 2\n---\n---\nplain\n...\n",
    "empty": "",
    "only comment": "# nothing\n",
    "deep": "x: " + "[" * 150 + "]" * 150 + "\n",
    "deep block": "".join(" " * i + f"k{i}:\n" for i in range(120)) + " " * 120 + "1\n",
    "bad date": "d: 2024-13-45\n",
    "bad yaml": "a: [1, 2\n",
    "tabs": "a:\n\t- 1\n",
    "bad binary": "b: !!binary '!!!'\n",
    "int key and str key": "1: a\n'1': b\n",
    "complex": "a: {b: [1, {c: d}], e: 'x'}\nf: [[], {}, [[]]]\n",
    "alias of scalar": "a: &s hello\nb: *s\n",
    "unknown alias": "a: *nope\n",
}


@pytest.mark.parametrize("name", DOCS)
def test_the_same_documents_or_the_same_error(name: str) -> None:
    expected = load(DOCS[name], Reference)
    got = load(DOCS[name], FastSafeLoader)
    assert same(got, expected), (got, expected)


def test_an_alias_is_the_same_object_as_its_anchor() -> None:
    doc = yaml.load(DOCS["anchors"], Loader=FastSafeLoader)
    assert doc["use"] is doc["base"]
    assert doc["again"][0] is doc["again"][1] is doc["list"]


def test_an_alias_bomb_builds_each_node_once() -> None:
    # Nine levels of ten aliases: 10**9 values expanded, ten lists built.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    doc = yaml.load("\n".join(lines), Loader=FastSafeLoader)
    assert doc["a9"][0] is doc["a8"]


def test_plain_manifests_take_the_fast_path_and_the_rest_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    slow: list[object] = []
    real = yaml.constructor.BaseConstructor.construct_document

    def counting(self, node):
        slow.append(node)
        return real(self, node)

    monkeypatch.setattr(yaml.constructor.BaseConstructor, "construct_document", counting)
    assert len(list(yaml.load_all(DOCS["manifests"], Loader=FastSafeLoader))) == 60
    assert slow == []
    list(yaml.load_all(DOCS["merge"] + "---\n" + DOCS["set"], Loader=FastSafeLoader))
    assert len(slow) == 2
    slow.clear()
    yaml.load(DOCS["deep"], Loader=FastSafeLoader)  # deeper than yamlload.MAX_DEPTH
    assert len(slow) == 1 and yamlload.MAX_DEPTH < 150


def test_mapping_keys_are_interned() -> None:
    doc = yaml.load("kubernetes-io-some-long-key-" + "x" * 30 + ": 1\n", Loader=FastSafeLoader)
    key = next(iter(doc))
    assert sys.intern(key) is key


def test_random_documents_agree() -> None:
    rng = random.Random(13)
    scalars = ["1", "-2", "0x10", "1.5", "yes", "No", "~", "null", "''", "'q'", "2024-01-02", "a b", "!!str 7", ".NaN"]

    def node(depth: int) -> str:
        r = rng.random()
        if depth > 5 or r < 0.4:
            return rng.choice(scalars)
        if r < 0.7:
            return "[" + ", ".join(node(depth + 1) for _ in range(rng.randint(0, 3))) + "]"
        keys = rng.sample(["a", "b", "1", "true", "~", "k k"], rng.randint(0, 3))
        return "{" + ", ".join(f"{k}: {node(depth + 1)}" for k in keys) + "}"

    for _ in range(300):
        text = "\n---\n".join(f"x: {node(0)}" for _ in range(rng.randint(1, 3)))
        assert same(load(text, FastSafeLoader), load(text, Reference)), text


def test_no_path_resolvers_as_the_fast_resolve_assumes() -> None:
    # FastSafeLoader answers resolve() and skips descend/ascend_resolver as BaseResolver does
    # only without path resolvers (yaml.add_path_resolver): none may be added.
    assert FastSafeLoader.yaml_path_resolvers == {}
    assert FastSafeLoader.yaml_implicit_resolvers is Reference.yaml_implicit_resolvers


def test_the_tag_cache_stays_bounded() -> None:
    text = "\n".join(f"k{i}: v{i}" for i in range(yamlload._TAGS_MAX + 10))
    doc = yaml.load(text, Loader=FastSafeLoader)
    assert len(doc) == yamlload._TAGS_MAX + 10
    assert len(yamlload._tags) <= yamlload._TAGS_MAX
