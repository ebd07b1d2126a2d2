"""What the shared service maps are built with: sizes, Maglev table size, algorithm, and the
capacity arithmetic (which map a change would overflow)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic.alias_generators import to_camel

from ..bpf import maps as M

if TYPE_CHECKING:
    from ..config import KprConfig

# The config key (bpf.mapSizes) that sizes each map the writer fills, and every map it sizes.
SIZE_KEYS = {"kpr_svc": "kprSvc", "kpr_slots": "kprSlots", "kpr_backend": "kprBackend", "kpr_revnat": "kprRevnat",
             "kpr_maglev": "kprMaglev", "kpr_srcrange": "kprSrcrange"}
SIZE_KEYS_ALL = {**SIZE_KEYS, "kpr_affinity": "kprAffinity"}


def first_overflow(
    current: dict[str, int], delta: dict[str, int], limits: dict[str, int]
) -> tuple[str, int, int] | None:
    """The first map (in SERVICE_MAPS order) that `delta` more entries would overflow, as
    (map, entries wanted, entries free); None when everything fits. A map the delta does not
    grow never overflows: a service that shrinks or stays the same is always let through."""
    for name in M.SERVICE_MAPS:
        d = delta.get(name, 0)
        have = current.get(name, 0)
        if d > 0 and have + d > limits[name]:
            return name, d, max(0, limits[name] - have)
    return None


@dataclass(frozen=True)
class Refusal:
    """Why a service is not (fully) programmed: the map it would overflow."""

    map: str
    # entries the service needs beyond what it holds now, and what the map has free
    need: int
    free: int
    max_entries: int
    # the service's growth per map: tried again once all of it fits
    delta: tuple[tuple[str, int], ...] = ()

    def text(self) -> str:
        key = SIZE_KEYS.get(self.map, self.map)
        return (
            f"{self.map} full: needs {self.need} more entries, {self.free} of {self.max_entries} free "
            f"(raise bpf.mapSizes.{key}); keeps its last good state"
        )


@dataclass(frozen=True)
class WriterParams:
    """What the shared maps are built with; programs must be compiled with the same values."""

    algorithm: str = "random"
    maglev_size: int = M.MAGLEV_DEFAULT_SIZE
    # max_entries overrides by map name.
    sizes: dict[str, int] = field(default_factory=dict)

    def cflags(self, pin_path: Path | str) -> list[str]:
        return M.cflags(pin_path, self.sizes, self.maglev_size)


# Plugin section keys (snake_case attributes) that configure the shared maps, and what they set.
_SHARED_KEYS = {"algorithm": "algorithm", "maglev_table_size": "maglev_size", "conntrack_size": "conntrack"}


def writer_params(config: "KprConfig") -> WriterParams:
    """The shared maps' settings, from the enabled plugins' sections.

    The maps are shared, so plugins that set the same knob (``algorithm``,
    ``maglevTableSize``, ``conntrackSize``) must agree; a disagreement is a ConfigError
    naming both keys.
    """
    from ..config import ConfigError

    chosen: dict[str, tuple[str, Any]] = {}
    problems = []
    for name, section in sorted(config.plugin_sections.items()):
        if section is None:
            continue
        for attr, knob in _SHARED_KEYS.items():
            value = getattr(section, attr, None)
            if value is None:
                continue
            key = f"plugins.{name}.{to_camel(attr)}"
            if knob in chosen and chosen[knob][1] != value:
                other_key, other = chosen[knob]
                problems.append(f"{key}: {value!r} disagrees with {other_key}: {other!r} (the service maps are shared)")
                continue
            chosen.setdefault(knob, (key, value))
    if problems:
        raise ConfigError(problems)
    sizes = config.bpf.map_size_overrides()
    if "conntrack" in chosen:
        ct = int(chosen["conntrack"][1])
        sizes.update(kpr_ct=ct, kpr_snat=ct)
    return WriterParams(
        algorithm=chosen.get("algorithm", ("", "random"))[1],
        maglev_size=int(chosen.get("maglev_size", ("", M.MAGLEV_DEFAULT_SIZE))[1]),
        sizes=sizes,
    )
