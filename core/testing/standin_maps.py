"""A stand-in for a BPF map in tests of Python that only dumps a map and deletes from it (the
NodePort collector's passes over kpr_ct, kpr_snat, ...): a dict, no kernel, no fd (so
kpr.nodeport.gc writes no slot through a program for it)."""

from __future__ import annotations


class DictMap:
    def __init__(self, items: dict[bytes, bytes] | None = None) -> None:
        self.d = dict(items or {})

    def items(self) -> list[tuple[bytes, bytes]]:
        return list(self.d.items())

    def delete_many(self, keys: list[bytes]) -> None:
        for k in keys:
            self.d.pop(k, None)
