"""The files source's depth bound on JSON manifests (a walk of its own, without the alias
count YAML needs) finds exactly what config.shape_problem finds."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from kpr.config import shape_problem
from kpr.sources.files import MAX_DEPTH, _json_shallow, _ParseError, _too_deep, parse_manifest


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


def test_the_bracket_bound_never_passes_what_the_walk_refuses() -> None:
    """_json_shallow (the brackets of the text alone) says shallow only where the walk finds
    nothing too deep, whatever strings hold (brackets, quotes, escapes), and says so for
    plain manifests: a wrong "shallow" would let a deep file through unchecked."""
    rng = random.Random(12)
    texts = ["s", "[", "]", "{", "}", '"', "\\", "[]", "{}", '"[', "a]b", "\n", "é{"]

    def word() -> str:
        return rng.choice(texts) if rng.random() < 0.03 else "s"  # most files hold none

    def grow(depth: int, target: int) -> object:
        if depth >= target:
            return rng.choice([1, 1.5, None, [], {}, word()])
        children = [grow(depth + 1, target)] + [rng.choice([1, word(), [], {}]) for _ in range(rng.randint(0, 2))]
        rng.shuffle(children)
        if rng.random() < 0.5:
            return children
        return {word() + str(i): c for i, c in enumerate(children)}

    said = {True: 0, False: 0}
    for _ in range(600):
        doc = grow(1, rng.choice([3, 20, MAX_DEPTH - 3, MAX_DEPTH - 1, MAX_DEPTH, MAX_DEPTH + 2]))
        data = json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()
        shallow = _json_shallow(data, MAX_DEPTH)
        if shallow:
            assert not _too_deep([doc], MAX_DEPTH), data[:200]
        said[shallow] += 1
    assert said[True] > 50 and said[False] > 50  # both ways were taken
    # Nesting up to 62 without a string holding a bracket, quote or escape: the fast way.
    for depth in (1, 7, MAX_DEPTH - 2):
        assert _json_shallow(json.dumps(nested(depth, "x")).encode(), MAX_DEPTH)
    assert not _json_shallow(json.dumps(nested(MAX_DEPTH - 1, "x")).encode(), MAX_DEPTH)  # near: the walk decides
    assert not _json_shallow(json.dumps({"a": "b[c"}).encode(), MAX_DEPTH)
    assert not _json_shallow(json.dumps({"a": 'b"c'}).encode(), MAX_DEPTH)


def test_long_integers_in_shallow_json_are_json_s() -> None:
    """The shallow path still gives json's reading of an integer orjson makes a float of
    (a 19-digit string beside it reads as the same string)."""
    text = json.dumps({"kind": "Service", "n": 12345678901234567890123, "s": "1234567890123456789012"}).encode()
    docs = parse_manifest("a.json", text)
    assert docs == [json.loads(text)] and type(docs[0]["n"]) is int
