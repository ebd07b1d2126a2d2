"""Root-free parts of `kpr explain`, `kpr status` and the drop vocabulary: parsing, reasons,
the status lines (real cli.main on a status the API would answer)."""

from __future__ import annotations

import json

import pytest

from kpr import api, cli, drops
from kpr.explain import ExplainError, parse_endpoint, parse_target


def test_parse_target_and_endpoint() -> None:
    t = parse_target("10.0.0.1:80")
    assert (t.address, t.port, t.protocol, t.proto) == ("10.0.0.1", 80, "TCP", 6)
    t = parse_target("[fd00::1]:53/udp")
    assert (t.address, t.port, t.protocol, t.text()) == ("fd00::1", 53, "UDP", "[fd00::1]:53/UDP")
    assert parse_endpoint("10.0.0.9", port_required=False) == ("10.0.0.9", None)
    assert parse_endpoint("fd00::9", port_required=False) == ("fd00::9", None)
    assert parse_endpoint("[fd00::9]:4000", port_required=False) == ("fd00::9", 4000)
    for bad, why in [
        ("10.0.0.1", "a port is required"),
        ("10.0.0.1:0", "port '0'"),
        ("10.0.0.1:80/ICMP", "protocol 'ICMP'"),
        ("web:80", "not an IP address"),
        ("[fd00::1:80", "missing ']'"),
    ]:
        with pytest.raises(ExplainError, match=why):
            parse_target(bad)


def test_explain_bad_via_and_missing_maps(tmp_path, capsys) -> None:
    assert cli.main(["explain", "10.0.0.1:80", "--via", "tc", "--pin-path", str(tmp_path)]) == 2
    assert "expected 'socket' or 'device NAME'" in capsys.readouterr().err
    assert cli.main(["explain", "10.0.0.1:80", "--via", "device", "--pin-path", str(tmp_path)]) == 2
    assert "needs the device name" in capsys.readouterr().err
    assert cli.main(["explain", "10.0.0.1:80", "--pin-path", str(tmp_path)]) == 1
    assert "no kpr service maps under" in capsys.readouterr().err
    # --via before the address: the address is still the target, not a device name
    assert cli.main(["explain", "--pin-path", str(tmp_path), "--via", "socket", "10.0.0.1:80"]) == 1
    assert "no kpr service maps under" in capsys.readouterr().err
    assert cli.main(["explain", "--pin-path", str(tmp_path), "--via", "device", "eth0", "10.0.0.1:80"]) == 1
    assert "no kpr service maps under" in capsys.readouterr().err
    assert cli.main(["explain", "--pin-path", str(tmp_path), "--via", "device", "eth0"]) == 2
    assert "the address to explain is missing" in capsys.readouterr().err


def test_drop_reasons_are_the_counter_names() -> None:
    counters = {"drop_source_range": 3.0, "fwd_drop_short": 1.0, "new_snat": 9.0, "drops_total": 4.0, "no_backend": 2.0}
    assert drops.drops("tc_nodeport", counters) == {"source_range": 3, "short_frame": 1}
    assert drops.drops("socklb", {"no_backend": 2.0, "connect": 5.0, "bind_refused": 1.0}) == {"no_backend": 2, "bind_refused": 1}
    assert drops.hook_of("xdp_nodeport") == "xdp" and drops.hook_of("socklb") == "socket"


def _status(maps: dict | None) -> dict:
    return {
        "version": "0", "node": {"name": "n1", "addresses": [], "devices": ["eth0"], "zone": ""}, "uptimeSeconds": 1.0,
        "source": {"kind": "files", "path": "/x", "synced": True, "errors": {}, "warnings": {}},
        "services": 1, "frontends": 1, "backends": 2, "ready": True, "maps": maps,
        "plugins": {
            "tc_nodeport": {
                "healthy": True, "message": "", "details": {},
                "counters": {"new_snat": 12.0, "drop_no_backend": 3.0, "drop_mtu": 0.0, "gc_errors": 1.0, "ratio": 0.5},
                "bus": {"delivered": 4, "errors": 0, "pending": 0, "failing": {}},
            }
        },
    }


def test_status_is_readable_at_a_glance(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr(api, "get", lambda *a, **k: _status({"count": 0, "first": [], "maps": {}}))
    assert cli.main(["status", "--socket", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "maps:     in sync" in out
    line = next(x for x in out.splitlines() if x.startswith("plugin tc_nodeport"))
    assert line == "plugin tc_nodeport: ok  errors=1  drops: no_backend=3"
    assert "new_snat" not in out
    assert cli.main(["status", "--verbose", "--socket", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "new_snat=12 " in out and "drop_mtu=0 " in out and "ratio=0.5" in out and "12.0" not in out
    assert cli.main(["status", "--json", "--socket", str(tmp_path / "s")]) == 0
    counters = json.loads(capsys.readouterr().out)["plugins"]["tc_nodeport"]["counters"]
    assert counters["new_snat"] == 12 and type(counters["new_snat"]) is int and counters["ratio"] == 0.5


def test_status_lists_the_first_differences(monkeypatch, capsys, tmp_path) -> None:
    diff = {"count": 7, "first": ["kpr_svc 10.0.0.1:80/TCP external slot 0: missing from the kernel"], "maps": {"kpr_svc": 6, "kpr_backend": 1}}
    monkeypatch.setattr(api, "get", lambda *a, **k: _status(diff))
    cli.main(["status", "--socket", str(tmp_path / "s")])
    out = capsys.readouterr().out
    assert "maps:     7 differences from the desired state (kpr_backend 1, kpr_svc 6)" in out
    diff["ageSeconds"] = 3.2
    cli.main(["status", "--socket", str(tmp_path / "s")])
    assert "(kpr_backend 1, kpr_svc 6) (compared 3s ago)" in capsys.readouterr().out
    assert "  diff:   kpr_svc 10.0.0.1:80/TCP external slot 0: missing from the kernel" in out
