"""The agent's end of the ExaBGP bridge, against a fake bridge: what is sent when, how acks
are matched, End-of-RIB after the routes, stale bridges turned away, resync on reconnect."""

import json
import socket
from pathlib import Path

import pytest

from kpr.plugins.announce_bgp.routes import Attrs
from kpr.plugins.announce_bgp.speaker import Speaker

P = "10.0.0.254"
R1 = (P, "10.0.100.10/32")
R2 = (P, "10.0.100.11/32")


class FakeBridge:
    """Speaks the bridge's side of the socket the way bridge.py + ExaBGP would."""

    def __init__(self, path: Path, token: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(5)
        self.reader = self.sock.makefile("rb")
        self.send(json.dumps({"hello": {"token": token, "pid": 4242}}))

    def send(self, line: str) -> None:
        self.sock.sendall((line + "\n").encode())

    def commands(self, n: int) -> list[str]:
        return [self.reader.readline().decode().strip() for _ in range(n)]

    def nothing_more(self, wait: float = 0.3) -> bool:
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(4096)
        except (TimeoutError, socket.timeout):
            return True
        finally:
            self.sock.settimeout(5)
        return data == b""

    def state(self, state: str, reason: str = "") -> None:
        nb = {"address": {"local": "10.0.0.1", "peer": P}, "asn": {"local": 64512, "peer": 64500}, "state": state}
        if reason:
            nb["reason"] = reason
        self.send(json.dumps({"exabgp": "5.0.0", "type": "state", "neighbor": nb}))

    def close(self) -> None:
        # The reader holds a reference: the connection only really closes with both gone.
        self.reader.close()
        self.sock.close()


@pytest.fixture
def speaker(tmp_path):
    sp = Speaker(tmp_path / "b.sock", [(P, ("ipv4",))])
    sp.start()
    yield sp
    sp.close()


def test_nothing_before_sync_then_routes_then_eor(speaker):
    speaker.expect("t1")
    speaker.update({R1: Attrs(communities=("64512:100",))})
    b = FakeBridge(speaker.socket_path, "t1")
    assert speaker.wait(lambda s: s.connected, 5)
    b.state("up")
    assert b.nothing_more(), "nothing may be sent before the initial sync"
    assert speaker.peers[P].state == "up"
    speaker.set_synced()
    assert b.commands(2) == [
        "neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self community [ 64512:100 ]",
        "neighbor 10.0.0.254 announce eor ipv4 unicast",
    ]
    b.send("done")
    b.send("done")
    assert speaker.wait(lambda s: R1 in s.acked and s.in_flight() == 0, 5)
    snap = speaker.snapshot()
    assert snap["advertised"] == 1 and snap["routes"][0]["state"] == "advertised"
    assert snap["peers"][P]["routes"] == 1

    # Changes are diffs: a new route, then a withdrawal; an unchanged route is not re-sent.
    speaker.update({R2: Attrs(), R1: Attrs(communities=("64512:100",))})
    assert b.commands(1) == ["neighbor 10.0.0.254 announce route 10.0.100.11/32 next-hop self"]
    speaker.update({R1: None})
    assert b.commands(1) == ["neighbor 10.0.0.254 withdraw route 10.0.100.10/32"]
    b.send("done")
    b.send("done")
    assert speaker.wait(lambda s: set(s.acked) == {R2}, 5)
    b.close()


def test_error_acks_mark_the_route_failed_without_retrying(speaker):
    speaker.expect("t1")
    speaker.set_synced()
    b = FakeBridge(speaker.socket_path, "t1")
    speaker.update({R1: Attrs(), R2: Attrs()})
    assert len(b.commands(2)) == 2
    b.send("error")
    b.send("done")
    assert speaker.wait(lambda s: s.in_flight() == 0, 5)
    assert set(speaker.failed) == {R1} and set(speaker.acked) == {R2}
    speaker.update({R1: Attrs()})  # same attributes: not retried
    assert b.nothing_more()
    speaker.update({R1: Attrs(med=5)})  # changed: sent again
    assert b.commands(1) == ["neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self med 5"]
    assert speaker.snapshot()["counters"]["acks_error"] == 1
    b.close()


def test_a_bridge_of_an_earlier_run_is_turned_away(speaker):
    speaker.expect("old")
    speaker.expect("new")
    speaker.set_synced()
    speaker.update({R1: Attrs()})
    stale = FakeBridge(speaker.socket_path, "old")
    assert stale.reader.readline() == b""  # closed at once
    assert not speaker.connected
    fresh = FakeBridge(speaker.socket_path, "new")
    assert fresh.commands(1) == ["neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self"]
    stale.close()
    fresh.close()


def test_reconnect_of_the_same_run_resends_everything_and_new_run_starts_over(speaker):
    speaker.expect("t1")
    speaker.set_synced()
    speaker.update({R1: Attrs(), R2: Attrs()})
    b = FakeBridge(speaker.socket_path, "t1")
    assert len(b.commands(2)) == 2
    b.close()
    assert speaker.wait(lambda s: not s.connected, 5)
    speaker.update({R2: None})  # while no bridge is connected
    b2 = FakeBridge(speaker.socket_path, "t1")
    # The same ExaBGP run may still hold R2: withdrawn; R1 re-sent in case it was lost.
    assert sorted(b2.commands(2)) == [
        "neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self",
        "neighbor 10.0.0.254 withdraw route 10.0.100.11/32",
    ]
    b2.close()
    speaker.expect("t2")  # ExaBGP restarted: it holds nothing
    speaker.exabgp_exited(-9)
    assert speaker.peers[P].state in ("idle", "down")
    b3 = FakeBridge(speaker.socket_path, "t2")
    assert b3.commands(1) == ["neighbor 10.0.0.254 announce route 10.0.100.10/32 next-hop self"]
    assert b3.nothing_more()
    b3.close()


def test_peer_state_follows_exabgp_events(speaker):
    speaker.expect("t1")
    speaker.set_synced()
    b = FakeBridge(speaker.socket_path, "t1")
    b.state("connected")
    assert speaker.wait(lambda s: s.peers[P].state == "connected", 5)
    b.state("up")
    assert b.commands(1) == ["neighbor 10.0.0.254 announce eor ipv4 unicast"]
    b.state("down", "peer reset, message [closing connection]")
    assert speaker.wait(lambda s: s.peers[P].state == "down", 5)
    assert "closing connection" in speaker.snapshot()["peers"][P]["reason"]
    b.state("up")  # every new session gets its End-of-RIB
    assert b.commands(1) == ["neighbor 10.0.0.254 announce eor ipv4 unicast"]
    assert speaker.peers[P].sessions == 2
    b.close()
