"""Label selectors with Kubernetes semantics (kpr.selectors: the serviceSelector of
announce_bgp's advertisements and lb_ipam's pools; their own tests show they use it)."""

import pydantic
import pytest

from kpr.selectors import EVERYTHING, LabelSelectorConfig, Requirement, Selector, check_key, check_value


def sel(match_labels=None, *exprs):
    return Selector.build(match_labels, exprs)


def test_empty_selector_matches_everything():
    assert EVERYTHING.empty
    assert EVERYTHING.matches({}) and EVERYTHING.matches({"a": "b"})
    assert LabelSelectorConfig().selector().matches({"anything": "x"})


def test_match_labels_all_must_match():
    s = sel({"app": "web", "tier": "front"})
    assert s.matches({"app": "web", "tier": "front", "extra": "1"})
    assert not s.matches({"app": "web"})
    assert not s.matches({"app": "web", "tier": "back"})


@pytest.mark.parametrize(
    "op,values,labels,expected",
    [
        ("In", ["a", "b"], {"k": "a"}, True),
        ("In", ["a", "b"], {"k": "c"}, False),
        ("In", ["a"], {}, False),  # In needs the key
        ("NotIn", ["a"], {"k": "b"}, True),
        ("NotIn", ["a"], {"k": "a"}, False),
        ("NotIn", ["a"], {}, True),  # NotIn matches an absent key, as in apimachinery
        ("Exists", [], {"k": ""}, True),
        ("Exists", [], {"other": "x"}, False),
        ("DoesNotExist", [], {}, True),
        ("DoesNotExist", [], {"k": "x"}, False),
    ],
)
def test_operators(op, values, labels, expected):
    assert Requirement("k", op, frozenset(values)).matches(labels) is expected


def test_labels_and_expressions_are_anded():
    s = sel({"app": "web"}, ("env", "In", ["prod", "staging"]), ("canary", "DoesNotExist", []))
    assert s.matches({"app": "web", "env": "prod"})
    assert not s.matches({"app": "web", "env": "dev"})
    assert not s.matches({"app": "web", "env": "prod", "canary": "true"})
    assert not s.matches({"app": "db", "env": "prod"})


@pytest.mark.parametrize(
    "op,values,msg",
    [("In", [], "needs at least one value"), ("NotIn", [], "needs at least one value"), ("Exists", ["x"], "takes no values"), ("Bogus", [], "operator must be")],
)
def test_bad_requirements(op, values, msg):
    with pytest.raises(ValueError, match=msg):
        Requirement("k", op, frozenset(values))


def test_label_key_and_value_syntax():
    assert check_key("app.kubernetes.io/name") == "app.kubernetes.io/name"
    assert check_key("a") == "a"
    for bad in ("", "-a", "a/", "/a", "Bad_Prefix/x", "a" * 64, "a b"):
        with pytest.raises(ValueError):
            check_key(bad)
    assert check_value("") == "" and check_value("v1.2_3-x") == "v1.2_3-x"
    for bad in ("-x", "x-", "a" * 64, "a b"):
        with pytest.raises(ValueError):
            check_value(bad)


def test_config_selector_round_trip():
    cfg = LabelSelectorConfig.model_validate(
        {"matchLabels": {"app": "web"}, "matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}
    )
    s = cfg.selector()
    assert s.matches({"app": "web"}) and s.matches({"app": "web", "env": "prod"})
    assert not s.matches({"app": "web", "env": "dev"})


@pytest.mark.parametrize(
    "data,where,msg",
    [
        ({"matchLabels": {"bad key": "x"}}, "matchLabels", "not a valid label key: 'bad key'"),
        ({"matchLabels": {"app": "-x"}}, "matchLabels", "not a valid label value: '-x'"),
        ({"matchExpressions": [{"key": "a/b/c", "operator": "Exists"}]}, "matchExpressions.0.key", "not a valid label key"),
        ({"matchExpressions": [{"key": "k", "operator": "In", "values": ["a b"]}]}, "matchExpressions.0.values", "not a valid label value"),
        ({"matchExpressions": [{"key": "k", "operator": "In"}]}, "matchExpressions.0", "operator In needs at least one value"),
        ({"matchExpressions": [{"key": "k", "operator": "Exists", "values": ["x"]}]}, "matchExpressions.0", "operator Exists takes no values"),
        ({"matchExpressions": [{"key": "k", "operator": "in", "values": ["x"]}]}, "matchExpressions.0.operator", "'In', 'NotIn', 'Exists' or 'DoesNotExist'"),
        ({"matchLabel": {"app": "web"}}, "matchLabel", "Extra inputs are not permitted"),
    ],
)
def test_config_mistakes_name_their_key(data, where, msg):
    with pytest.raises(pydantic.ValidationError) as e:
        LabelSelectorConfig.model_validate(data)
    err = e.value.errors()[0]
    assert ".".join(str(p) for p in err["loc"]) == where
    assert msg in err["msg"]
