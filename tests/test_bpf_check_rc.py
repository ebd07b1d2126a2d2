"""kpr.bpf.maps.check_rc, the one check of libbpf's returns, is public: the modules that call
libbpf use it, not a private name of kpr.bpf.maps (kpr.bpf.progcache did). The check reads
each module's imports (ast), so a private name is caught however it is reached: imported
(absolute or relative), or an attribute of any name the module is bound to (a regular
expression on `M._`/`maps._` let `from .maps import _UNSUPPORTED` through)."""

from __future__ import annotations

import ast
import errno
from pathlib import Path

import pytest

from kpr.bpf import maps as M

ROOT = Path(M.__file__).resolve().parents[2]


def test_check_rc_returns_a_result_and_names_a_failure():
    assert M.check_rc(7, "bpf_obj_get /x") == 7
    assert M.check_rc(0, "bpf_obj_get /x") == 0
    with pytest.raises(OSError) as e:
        M.check_rc(-errno.ENOENT, "bpf_obj_get /sys/fs/bpf/none")
    assert e.value.errno == errno.ENOENT
    assert str(e.value).endswith("bpf_obj_get /sys/fs/bpf/none: No such file or directory")


MAPS = "kpr.bpf.maps"


def _package(path: Path) -> str | None:
    """The package a file under ROOT is in, as installed (core is kpr, plugins kpr.plugins)."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    top = {"core": ("kpr",), "plugins": ("kpr", "plugins")}.get(parts[0])
    return ".".join(top + parts[1:-1]) if top is not None else None


def _absolute(node: ast.ImportFrom, package: str | None) -> str | None:
    if not node.level:
        return node.module
    if package is None:
        return None
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(path: Path, text: str | None = None) -> list[str]:
    """Where `path` reaches a private name of kpr.bpf.maps: `from kpr.bpf.maps import _x`
    (or relative, `from .maps import _x`, `from ..bpf.maps import _x`), or `M._x` for any
    name M bound to the module (`from kpr.bpf import maps as M`, `import kpr.bpf.maps as M`,
    `from . import maps`), or `kpr.bpf.maps._x`."""
    tree = ast.parse(path.read_text() if text is None else text, str(path))
    package = _package(path)
    names: set[str] = set()  # local names bound to the module
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(node, package)
            for a in node.names:
                if module == MAPS and _private(a.name):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {module} import {a.name}")
                if module is not None and f"{module}.{a.name}" == MAPS:
                    names.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == MAPS and a.asname:
                    names.add(a.asname)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            owner = ast.unparse(node.value)
            if owner in names or owner == MAPS:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.attr}")
    return found


def test_no_module_reaches_into_kpr_bpf_maps_private_names():
    used = []
    for tree in ("core", "plugins", "tests"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            if path != Path(M.__file__).resolve():
                used.extend(private_uses(path))
    assert not used, "\n".join(used)


@pytest.mark.parametrize("where, text", [
    ("core/bpf", "from kpr.bpf.maps import _UNSUPPORTED"),
    ("core/bpf", "from kpr.bpf.maps import check_rc, _check as c"),
    ("core/bpf", "from .maps import _x"),
    ("core/servicemaps", "from ..bpf.maps import _x"),
    ("core/bpf", "from . import maps\nmaps._x"),
    ("core", "from .bpf import maps as bm\nbm._x()"),
    ("tests", "from kpr.bpf import maps as bm\nbm._x()"),
    ("plugins/socklb", "import kpr.bpf.maps as mm\nmm._x"),
    ("tests", "import kpr.bpf.maps\nkpr.bpf.maps._x"),
])
def test_each_form_of_reaching_a_private_name_is_caught(where, text):
    assert private_uses(ROOT / where / "probe.py", text), text


def test_public_names_and_other_modules_private_names_pass():
    path = ROOT / "core" / "bpf" / "probe.py"
    for text in ("from kpr.bpf.maps import check_rc\nfrom .links import _x\nimport kpr.bpf.maps\nkpr.bpf.maps.check_rc",
                 "from . import maps as M\nM.check_rc\nM.__name__[:0]\nother._x"):
        assert private_uses(path, text) == [], text
