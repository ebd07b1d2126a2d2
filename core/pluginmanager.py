"""Finding, validating and configuring plugins.

Built-in and third-party plugins are found the same way, through the ``kpr.plugins``
entry-point group; the config decides which are enabled. The manager is built by a function,
never at import, so tests and ``kpr check-config`` get a fresh one each time.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import pluggy
import pydantic

from . import ENTRY_POINT_GROUP, PROJECT, hookspecs
from .config import ConfigError, KprConfig, format_errors
from .context import KubeAccess, PluginContext
from .model import NodeInfo

log = logging.getLogger(__name__)


class PluginError(Exception):
    """Start-up cannot go on because of a plugin; the message names it."""


@dataclass
class Discovered:
    name: str
    # "module:attr" the entry point names.
    value: str
    # The distribution that ships the plugin ("kpr" for built-in ones).
    dist: str
    version: str
    entry_point: metadata.EntryPoint | None = None
    # An object given directly (core-internal plugins, tests) instead of an entry point.
    obj: Any = None

    @property
    def builtin(self) -> bool:
        return self.dist == PROJECT

    def load(self) -> Any:
        obj = self.obj if self.obj is not None else self.entry_point.load()
        # A class is instantiated so each agent gets its own plugin state.
        return obj() if inspect.isclass(obj) else obj


def discover() -> dict[str, Discovered]:
    found: dict[str, Discovered] = {}
    # A distribution's name and version parse its METADATA file at every read: once per
    # distribution, not twice per entry point (kpr's own seven: 15 ms at every start).
    facts: dict[int, tuple[str, str]] = {}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.dist is None:
            dist = version = "?"
        else:
            known = facts.get(id(ep.dist))
            if known is None:
                meta = ep.dist.metadata
                known = facts[id(ep.dist)] = (meta["Name"], meta["Version"])
            dist, version = known
        if ep.name in found and found[ep.name].value != ep.value:
            raise PluginError(
                f"plugin name {ep.name!r} is claimed by two packages: "
                f"{found[ep.name].dist} ({found[ep.name].value}) and {dist} ({ep.value})"
            )
        found[ep.name] = Discovered(ep.name, ep.value, dist, version, entry_point=ep)
    return found


@dataclass
class PluginHandle:
    """One enabled plugin: its object, context, config section and per-plugin hook callers."""

    name: str
    plugin: Any
    info: Discovered
    section: pydantic.BaseModel | None
    context: PluginContext | None = None
    # A core facility (FACILITIES) rather than a plugin some package installed.
    facility: bool = False
    _pm: pluggy.PluginManager | None = field(default=None, repr=False)
    _callers: dict[str, Callable[..., list]] = field(default_factory=dict, repr=False)

    def call(self, hook: str, **kwargs: Any) -> list:
        """Call one hook of this plugin only; its exceptions reach the caller."""
        caller = self._callers.get(hook)
        if caller is None:
            caller = self._callers[hook] = self._caller(hook)
        return caller(**kwargs)

    def _caller(self, hook: str) -> Callable[..., list]:
        hc = getattr(self._pm.hook, hook)
        impls = [i for i in hc.get_hookimpls() if i.plugin is self.plugin]
        if len(impls) == 1 and not impls[0].hookwrapper and not impls[0].wrapper:
            # The plugin's one plain implementation, called as pluggy's _multicall calls it
            # (the spec's defaults, the arguments it names, a list of its non-None result; no
            # hook here is firstresult), without the subset caller: pluggy's costs about 5 us a
            # call, and an initial sync of 20k services is 20k calls per plugin before ready.
            fn, names, kwnames = impls[0].function, impls[0].argnames, impls[0].kwargnames
            defaults = dict(getattr(hc.spec, "kwargdefaults", None) or {})

            def direct(**kwargs: Any) -> list:
                if kwnames:
                    if defaults:
                        kwargs = {**defaults, **kwargs}
                    try:
                        args = [kwargs[a] for a in names]
                    except KeyError as e:
                        raise pluggy.HookCallError(f"hook call must provide argument {e.args[0]!r}") from None
                    result = fn(*args, **{a: kwargs[a] for a in kwnames if a in kwargs})
                else:
                    # (the defaults not merged into a new dict each call: 20k calls before ready)
                    try:
                        args = [kwargs[a] if a in kwargs else defaults[a] for a in names]
                    except KeyError as e:
                        raise pluggy.HookCallError(f"hook call must provide argument {e.args[0]!r}") from None
                    result = fn(*args)
                return [] if result is None else [result]

            return direct
        others = [p for p in self._pm.get_plugins() if p is not self.plugin]
        return self._pm.subset_hook_caller(hook, remove_plugins=others)

    def implements(self, hook: str) -> bool:
        return any(impl.plugin is self.plugin for impl in getattr(self._pm.hook, hook).get_hookimpls())


class KprPluginManager:
    def __init__(self, pm: pluggy.PluginManager, handles: list[PluginHandle], discovered: dict[str, Discovered]):
        self.pm = pm
        self.handles = handles
        self.discovered = discovered

    def handle(self, name: str) -> PluginHandle:
        for h in self.handles:
            if h.name == name:
                return h
        raise KeyError(name)

    def facility(self, name: str) -> PluginHandle | None:
        """The core facility of that name, when an enabled plugin required it."""
        return next((h for h in self.handles if h.facility and h.name == name), None)


def _schema_of(obj: Any, name: str) -> type[pydantic.BaseModel] | None:
    # A throwaway manager so a disabled plugin's schema can be read without registering it.
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(obj, name=name)
    results = [r for r in pm.hook.kpr_config_schema() if r is not None]
    if not results:
        return None
    schema = results[0]
    if not (inspect.isclass(schema) and issubclass(schema, pydantic.BaseModel)):
        raise PluginError(f"plugin {name}: kpr_config_schema must return a pydantic model class, got {schema!r}")
    return schema


def validate_section(name: str, schema: type[pydantic.BaseModel] | None, raw: dict) -> tuple[pydantic.BaseModel | None, list[str]]:
    prefix = ("plugins", name)
    if schema is None:
        problems = [f"plugins.{name}.{key}: unknown key (plugin {name} has no settings)" for key in raw]
        return None, problems
    try:
        return schema.model_validate(raw), []
    except pydantic.ValidationError as e:
        return None, format_errors(e, prefix)


def build_plugin_manager(
    config: KprConfig,
    *,
    internal: dict[str, Any] | None = None,
    discovered: dict[str, Discovered] | None = None,
    facilities: dict[str, Callable[[KprConfig], Any]] | None = None,
) -> KprPluginManager:
    """Specs, then every discovered plugin the config enables, then their sections, then
    ``check_pending()``. Raises ConfigError for bad sections and PluginError for the rest.

    ``internal`` adds core-owned plugin objects by name (always enabled); ``facilities``
    maps the names plugins may ask for with ``kpr_requires`` to factories (default FACILITIES).
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    found = dict(discover() if discovered is None else discovered)
    for name, obj in (internal or {}).items():
        found[name] = Discovered(name, f"<internal {type(obj).__name__}>", PROJECT, "", obj=obj)

    missing = [n for n in config.plugins if n not in found]
    if missing:
        installed = ", ".join(sorted(found)) or "none"
        raise PluginError(
            "config names plugins that are not installed: "
            + ", ".join(f"plugins.{n}" for n in missing)
            + f" (installed: {installed})"
        )

    problems: list[str] = []
    handles: list[PluginHandle] = []
    enabled = set(config.enabled_plugins()) | set(internal or {})
    for name in list(config.plugins) + [n for n in (internal or {}) if n not in config.plugins]:
        info = found[name]
        try:
            obj = info.load()
        except Exception as e:  # a broken third-party package must not hide which one it is
            raise PluginError(f"plugin {name} ({info.value} from {info.dist}) failed to import: {e}") from e
        try:
            schema = _schema_of(obj, name)
        except pluggy.PluginValidationError as e:
            raise PluginError(f"plugin {name} ({info.dist}): {e}") from None
        section, errs = validate_section(name, schema, config.plugin_raw(name))
        problems.extend(errs)
        if name in enabled:
            handles.append(PluginHandle(name, obj, info, section))
    if problems:
        raise ConfigError(problems)
    # Facilities read the enabled plugins' sections (e.g. the writer's algorithm and sizes).
    config.plugin_sections.update({h.name: h.section for h in handles})
    handles = _add_facilities(handles, config, facilities if facilities is not None else FACILITIES)

    for h in handles:
        try:
            pm.register(h.plugin, name=h.name)
        except (pluggy.PluginValidationError, ValueError) as e:
            raise PluginError(f"plugin {h.name} ({h.info.dist}): {e}") from None
        h._pm = pm
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        plugin_name = pm.get_name(e.plugin) if e.plugin is not None else "?"
        raise PluginError(f"plugin {plugin_name}: {e} (is the hook name misspelt? every kpr hook is listed in kpr.hookspecs)") from None
    return KprPluginManager(pm, handles, found)


def _service_map_writer(config: KprConfig) -> Any:
    from .servicemaps import ServiceMapWriter, writer_params

    params = writer_params(config)
    return ServiceMapWriter(config.bpf.pin_path, algorithm=params.algorithm, maglev_size=params.maglev_size, sizes=params.sizes)


# Core facilities plugins may ask for with kpr_requires: name -> factory of a core-owned
# object, registered ahead of every plugin so it starts first and stops last. The service map
# writer ("servicemaps") is not fed by a bus worker as plugins are: it is the bus's writer
# stage (kpr.pipeline), which applies every change before any plugin gets it.
def _nodeport_facility(config: KprConfig) -> Any:
    from .nodeport.facility import NodePortFacility

    return NodePortFacility.from_config(config)


def _nexthops_facility(config: KprConfig) -> Any:
    from .nexthops import NextHopsFacility

    return NextHopsFacility()


FACILITIES: dict[str, Callable[[KprConfig], Any]] = {"servicemaps": _service_map_writer, "nodeport": _nodeport_facility,
                                                     "nexthops": _nexthops_facility}


def _add_facilities(handles: list[PluginHandle], config: KprConfig, facilities: dict[str, Callable[[KprConfig], Any]]) -> list[PluginHandle]:
    wanted: list[str] = []
    for h in handles:
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(hookspecs)
        pm.register(h.plugin, name=h.name)
        for names in pm.hook.kpr_requires():
            for name in names or []:
                if name not in facilities:
                    raise PluginError(f"plugin {h.name} requires {name!r}, which this kpr does not provide (known: {', '.join(sorted(facilities))})")
                if name not in wanted:
                    wanted.append(name)
    extra = []
    for name in wanted:
        if any(h.name == name for h in handles):
            continue
        obj = facilities[name](config)
        if name == "servicemaps" and "nodeport" not in wanted:
            # only the NodePort programs read kpr_fe: with none, no copy to keep on every write
            obj.frontend_table = False
        extra.append(
            PluginHandle(name, obj, Discovered(name, f"<core {type(obj).__name__}>", PROJECT, "", obj=obj), None, facility=True)
        )
    return extra + handles


def hook_caller(plugin: Any, name: str = "plugin") -> Callable[..., list]:
    """An invoker for EventBus.add_plugin that calls one plugin object's hooks as the agent
    does: through pluggy, so an implementation gets only the arguments it names (tests and
    test harnesses driving the real bus with a plugin the agent did not load)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=name)

    def call(hook: str, **kwargs: Any) -> list:
        return getattr(pm.hook, hook)(**kwargs)

    return call


def check_config(config: KprConfig) -> None:
    """Validate every plugin section in the config, enabled or not. Raises on the first kind of problem."""
    build_plugin_manager(config)


def make_contexts(kpm: KprPluginManager, config: KprConfig, node: NodeInfo) -> None:
    kube = KubeAccess(config)
    for h in kpm.handles:
        state_dir = Path(config.agent.state_dir) / "plugins" / h.name
        h.context = PluginContext(
            name=h.name,
            node=node,
            log=logging.getLogger(f"kpr.plugins.{h.name}"),
            config=config,
            state_dir=state_dir,
            kube=kube,
        )
