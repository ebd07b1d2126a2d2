"""kpr.bpf.maps.check_rc, the one check of libbpf's returns, is public: the modules that call
libbpf use it, not a private name of kpr.bpf.maps (kpr.bpf.progcache did)."""

from __future__ import annotations

import errno
import re
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


def test_no_module_reaches_into_kpr_bpf_maps_private_names():
    used = []
    for tree in ("core", "plugins", "tests"):
        for path in sorted((ROOT / tree).rglob("*.py")):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"\b(M|maps)\._[a-zA-Z]", line):
                    used.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not used, "\n".join(used)
