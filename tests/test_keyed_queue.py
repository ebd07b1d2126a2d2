"""KeyedQueue (a bus worker's and the writer stage's queue) keeps its meaning: one event per key
in arrival order, a newer one taking a waiting one's place unless a barrier (a node change)
came between. Checked against the plain model of that rule over random operations."""

from __future__ import annotations

import random

from kpr.bus import Event, KeyedQueue


class Model:
    """The rule as a list: (stretch, key, event), a barrier closing its stretch."""

    def __init__(self) -> None:
        self.items: list[tuple[int, object, Event]] = []
        self.stretch = 0

    def put(self, ev: Event) -> None:
        for i, (st, key, _old) in enumerate(self.items):
            if st == self.stretch and key == ev.key:
                self.items[i] = (st, key, ev)
                break
        else:
            self.items.append((self.stretch, ev.key, ev))
        if ev.event == "node":
            self.stretch += 1

    def pop(self) -> Event:
        return self.items.pop(0)[2]

    def drain(self) -> list[Event]:
        out = [ev for _st, _k, ev in self.items]
        self.items = []
        return out

    def waiting(self, key: object) -> bool:
        return any(k == key for _st, k, _ev in self.items)


def _event(rnd: random.Random) -> Event:
    kind = rnd.choice(("upsert", "upsert", "upsert", "delete", "node", "pods"))
    key = {"node": ("__node__",), "pods": ("__pods__",)}.get(kind) or rnd.choice("abcdefg")
    return Event(key, kind, rnd.random())


def test_queue_follows_the_rule() -> None:
    rnd = random.Random(11)
    for _ in range(400):
        q, m = KeyedQueue(), Model()
        for _ in range(rnd.randrange(1, 40)):
            op = rnd.random()
            if op < 0.45:
                ev = _event(rnd)
                q.put(ev)
                m.put(ev)
            elif op < 0.7:
                batch = [_event(rnd) for _ in range(rnd.randrange(0, 8))]
                q.put_many(batch)
                for ev in batch:
                    m.put(ev)
            elif op < 0.9:
                if m.items:
                    assert q.pop() == m.pop()
            else:
                assert q.drain() == m.drain()
            assert len(q) == len(m.items)
            assert [q.waiting(k) for k in "abcdefg"] == [m.waiting(k) for k in "abcdefg"]
            assert q.waiting(("__node__",)) == m.waiting(("__node__",))
        assert q.drain() == m.drain()
        assert len(q) == 0 and not q.waiting("a")


def test_popping_every_event_one_by_one() -> None:
    # (barriers between: each pop takes the oldest, across stretches)
    q, m = KeyedQueue(), Model()
    for i in range(30):
        ev = Event(("__node__",), "node", i) if i % 7 == 3 else Event("k%d" % (i % 5), "upsert", i)
        q.put(ev)
        m.put(ev)
    while m.items:
        assert q.pop() == m.pop()
    assert len(q) == 0
