"""Meta-tests: every hook is prefixed, typed, documented and exercised by a test."""

import inspect
import re
from pathlib import Path

import pytest

from kpr import hookspecs

HOOKS = sorted(n for n, f in vars(hookspecs).items() if callable(f) and n.startswith("kpr_"))
TESTS = Path(__file__).parent


def test_hookspec_module_defines_the_expected_lifecycle():
    assert set(HOOKS) >= {
        "kpr_config_schema",
        "kpr_configure",
        "kpr_start",
        "kpr_stop",
        "kpr_service_upsert",
        "kpr_service_delete",
        "kpr_sync_complete",
        "kpr_node_changed",
        "kpr_status",
    }


def test_only_kpr_prefixed_hooks():
    specs = [n for n, f in vars(hookspecs).items() if hasattr(f, "kpr_spec")]
    assert specs and all(n.startswith("kpr_") for n in specs)
    assert sorted(specs) == HOOKS


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert "Called:" in doc, f"{name}: say when it is called"
    assert "Returns:" in doc, f"{name}: say what it returns"
    params = [p for p in inspect.signature(getattr(hookspecs, name)).parameters]
    for p in params:
        assert re.search(rf"^\s+{p}:", doc, re.M), f"{name}: document argument {p}"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_typed(name):
    sig = inspect.signature(getattr(hookspecs, name))
    assert sig.return_annotation is not inspect.Signature.empty, f"{name}: annotate the return"
    for p in sig.parameters.values():
        assert p.annotation is not inspect.Parameter.empty, f"{name}: annotate {p.name}"


def test_first_result_is_never_used_silently():
    # The module docstring promises no firstresult hooks; keep it true or update the docs.
    for name in HOOKS:
        opts = getattr(getattr(hookspecs, name), "kpr_spec")
        assert not opts.get("firstresult"), name


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_exercised_by_a_test(name):
    sources = [p.read_text() for p in TESTS.rglob("test_*.py") if p.name != "test_hookspecs.py"]
    assert any(name in s for s in sources), f"no test mentions {name}"
