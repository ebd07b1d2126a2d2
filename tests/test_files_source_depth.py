"""The files source's depth bound on JSON manifests (a walk of its own, without the alias
count YAML needs) finds exactly what config.shape_problem finds."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from kpr.config import shape_problem
from kpr.sources.files import MAX_DEPTH, _ParseError, _too_deep, parse_manifest


def nested(depth: int, leaf: object) -> object:
    """`leaf` inside `depth` containers, alternating lists and dicts."""
    value = leaf
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


@pytest.mark.parametrize("depth", [MAX_DEPTH - 2, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 1, 200])
@pytest.mark.parametrize("leaf", [1, [], {}, "x"], ids=["scalar", "empty-list", "empty-dict", "string"])
def test_the_json_bound_is_shape_problems_bound(depth: int, leaf: object) -> None:
    doc = {"kind": "Service", "x": nested(depth, leaf)}
    expected = shape_problem([doc], max_depth=MAX_DEPTH, max_nodes=10**9, depth0=0)
    assert _too_deep([doc], MAX_DEPTH) == bool(expected)
    text = json.dumps(doc).encode()
    if expected:
        with pytest.raises(_ParseError, match=f"^nested deeper than {MAX_DEPTH} levels$"):
            parse_manifest("deep.json", text)
    else:
        assert parse_manifest("deep.json", text) == [doc]


def test_random_shapes_agree() -> None:
    rng = random.Random(11)

    def grow(depth: int, target: int) -> object:
        """A spine down to `target`, with random scalars and empty containers beside it."""
        if depth >= target:
            return rng.choice([1, "s", None, True, [], {}])
        children = [grow(depth + 1, target)] + [rng.choice([1, "s", [], {}]) for _ in range(rng.randint(0, 2))]
        rng.shuffle(children)
        if rng.random() < 0.5:
            return children
        return {f"k{i}": c for i, c in enumerate(children)}

    seen = set()
    for _ in range(400):
        docs = [grow(1, rng.randint(MAX_DEPTH - 3, MAX_DEPTH + 3)) for _ in range(rng.randint(1, 3))]
        expected = bool(shape_problem(docs, max_depth=MAX_DEPTH, max_nodes=10**9, depth0=0))
        assert _too_deep(docs, MAX_DEPTH) == expected
        seen.add(expected)
    assert seen == {True, False}  # both outcomes were tried


@pytest.mark.parametrize("star", ["", "  note: '*.example.com'\n"], ids=["no-star", "star-in-a-string"])
@pytest.mark.parametrize("depth", [MAX_DEPTH - 2, MAX_DEPTH + 2])
def test_yaml_without_aliases_gets_the_same_bound(depth: int, star: str) -> None:
    """YAML without a `*` (no alias) takes the depth walk; with one, shape_problem: the
    same answer either way."""
    text = f"kind: Service\nmetadata:\n  name: x\n{star}x: " + "[" * depth + "1" + "]" * depth + "\n"
    doc = yaml.safe_load(text)
    expected = shape_problem([doc], max_depth=MAX_DEPTH, max_nodes=10**9, depth0=0)
    if expected:
        with pytest.raises(_ParseError, match=f"^nested deeper than {MAX_DEPTH} levels$"):
            parse_manifest("deep.yaml", text.encode())
    else:
        assert parse_manifest("deep.yaml", text.encode()) == [doc]
    assert bool(expected) == (depth > MAX_DEPTH - 2)
