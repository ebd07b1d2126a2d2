"""pytest imports test modules by basename (rootdir-relative, no __init__.py): two test files
with one name anywhere in the suite's testpaths (tests/, tests/kernel/, examples/plugin/tests/)
stop the whole collection with "import file mismatch". Catch it here with a message naming
both files."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def suite_dirs() -> list[Path]:
    """The directories pyproject.toml's [tool.pytest.ini_options] testpaths names."""
    import tomllib

    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [ROOT / p for p in conf["tool"]["pytest"]["ini_options"]["testpaths"]]


def test_the_suite_collects_tests_and_the_example_plugins_tests() -> None:
    assert {p.relative_to(ROOT).as_posix() for p in suite_dirs()} >= {"tests", "examples/plugin/tests"}


def test_test_module_basenames_are_unique() -> None:
    seen: dict[str, list[str]] = defaultdict(list)
    for top in suite_dirs():
        for path in top.rglob("test_*.py"):
            seen[path.name].append(str(path.relative_to(ROOT)))
    clashes = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not clashes, f"test modules sharing a basename (rename one of each): {clashes}"
