"""The informer's handling of what a watch stream may carry, garbage included, and its
backoff and rate limit: pure logic, no server."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from kpr.kube import client as kube_client
from kpr.kube.client import RateLimiter
from kpr.kube.informer import Informer, JitterBackoff, Watched, _Expired, _StreamError


class Handler:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict]] = []

    def listed(self, kind, items, rv):
        pass

    def event(self, kind, type_, obj):
        self.events.append((kind, type_, obj))

    def failed(self, kind, reason):
        pass

    def recovered(self, kind):
        pass


@pytest.fixture
def inf():
    h = Handler()
    return Informer(Watched("Service", "v1", lambda **kw: None), h, RateLimiter(100, 10))


CASES = [
    # (description, line, expected: "event" | "bookmark" | exception type)
    ("an added object", '{"type":"ADDED","object":{"metadata":{"name":"a","resourceVersion":"7"}}}', "event"),
    ("a bookmark moves the resourceVersion only", '{"type":"BOOKMARK","object":{"kind":"Service","metadata":{"resourceVersion":"9"}}}', "bookmark"),
    ("410 in the stream means relist", '{"type":"ERROR","object":{"kind":"Status","code":410,"reason":"Expired"}}', _Expired),
    ("another ERROR event", '{"type":"ERROR","object":{"kind":"Status","code":500,"message":"boom"}}', _StreamError),
    ("not JSON", "<html>proxy error</html>", _StreamError),
    ("JSON but not an event", "[1, 2]", _StreamError),
    ("an event without an object", '{"type":"ADDED"}', _StreamError),
    ("an object that is not a mapping", '{"type":"ADDED","object":"x"}', _StreamError),
    ("an unknown event type", '{"type":"EXPLODED","object":{}}', _StreamError),
]


@pytest.mark.parametrize("desc,line,expected", CASES, ids=[c[0] for c in CASES])
def test_watch_lines(inf, desc, line, expected):
    if isinstance(expected, type):
        with pytest.raises(expected):
            inf._on_line(line)
        assert not inf.handler.events
    elif expected == "event":
        inf._on_line(line)
        (kind, type_, obj), = inf.handler.events
        assert (kind, type_, obj["kind"], obj["apiVersion"]) == ("Service", "ADDED", "Service", "v1")
        assert inf.stats.resource_version == "7"
    else:
        inf._on_line(line)
        assert not inf.handler.events and inf.stats.resource_version == "9"
        assert inf.stats.events["BOOKMARK"] == 1


def test_backoff_grows_with_jitter_and_stays_under_the_cap():
    b = JitterBackoff(initial=0.2, maximum=3.0)
    for attempt, base in ((1, 0.2), (2, 0.4), (3, 0.8), (10, 3.0), (50, 3.0)):
        delays = [b.delay(attempt) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays), attempt
        assert len(set(delays)) > 1, "jittered"


def test_rate_limiter_allows_the_burst_then_qps(monkeypatch):
    # The burst needs no wait: with `stop` already set, a wait that had to sleep answers False.
    # (A refill of one token per 1000 s keeps a slow machine from earning a sixth meanwhile.)
    rl = RateLimiter(qps=0.001, burst=5)
    stop = threading.Event()
    stop.set()
    assert [rl.wait(stop) for _ in range(6)] == [True] * 5 + [False], "5 at once, the sixth waits"
    # The pace on a clock of the test's own, which each sleep moves by what it asked for: a
    # loaded machine that wakes late changes nothing (no wall-clock bound). 64/s: a token's
    # 1/64 s adds up exactly in binary (0.02 s left the bucket a rounding short of a token,
    # and the limiter then asks for sleeps too small to move a clock of 1000 s).
    now = [1000.0]
    slept = []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    monkeypatch.setattr(kube_client, "time", SimpleNamespace(monotonic=lambda: now[0], sleep=sleep))
    rl = RateLimiter(qps=64, burst=5)
    for _ in range(15):
        assert rl.wait()
    assert slept == [1 / 64] * 10, "the burst at once, then 10 more at 64/s"


def test_rate_limiter_wait_ends_when_stopping():
    rl = RateLimiter(qps=0.1, burst=1)
    assert rl.wait()
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    # The next token is 10 s away: False (not True after the sleep) shows the stop ended the
    # wait, without a clock bound a loaded machine trips.
    assert rl.wait(stop) is False


def test_a_handler_that_fails_on_one_event_does_not_stop_the_stream():
    class Choking(Handler):
        def event(self, kind, type_, obj):
            if obj["metadata"]["name"] == "bad":
                raise ValueError("cannot use it")
            super().event(kind, type_, obj)

    inf = Informer(Watched("Service", "v1", lambda **kw: None), Choking(), RateLimiter(100, 10))
    inf._on_line('{"type":"ADDED","object":{"metadata":{"name":"bad","resourceVersion":"5"}}}')
    inf._on_line('{"type":"ADDED","object":{"metadata":{"name":"good","resourceVersion":"6"}}}')
    assert [o["metadata"]["name"] for _, _, o in inf.handler.events] == ["good"]
    assert inf.stats.errors == 1 and inf.stats.resource_version == "6"
