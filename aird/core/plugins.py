"""Discovers plugins through the ``aird`` entry-point group and collects what they register.

A plugin that fails to import or to register is recorded as broken (one line in ``aird plugins``) and does
not stop the other commands.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Iterable

import pluggy

from aird.core.errors import PluginError
from aird.core.hookspecs import PROJECT, Compressor, Engine, Probe, Repair, Scorer, Specs

ENTRY_POINT_GROUP = "aird"
KINDS: dict[str, type] = {"compressor": Compressor, "probe": Probe, "scorer": Scorer, "repair": Repair,
                          "engine": Engine}


@dataclass(frozen=True)
class Registered:
    kind: str
    name: str
    obj: Any
    plugin: str       # entry-point name
    origin: str       # distribution that provides it ("aird" for the built-ins)
    version: str

    @property
    def builtin(self) -> bool:
        return self.origin == "aird"


@dataclass(frozen=True)
class Broken:
    plugin: str
    origin: str
    error: str


class PluginRegistry:
    def __init__(self, items: list[Registered], broken: list[Broken]):
        self.items = items
        self.broken = broken

    def of(self, kind: str) -> list[Registered]:
        return [r for r in self.items if r.kind == kind]

    def get(self, kind: str, name: str) -> Any:
        for r in self.of(kind):
            if r.name == name:
                return r.obj
        known = ", ".join(r.name for r in self.of(kind)) or "none"
        hint = ""
        if any(b for b in self.broken):
            hint = f" ({len(self.broken)} plugin(s) failed to load; see `aird plugins`)"
        raise PluginError(f"unknown {kind} {name!r}; available: {known}{hint}.")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def build_registry(entry_points: Iterable[md.EntryPoint]) -> PluginRegistry:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(Specs)
    origins: dict[str, tuple[str, str]] = {}
    broken: list[Broken] = []
    for ep in entry_points:
        dist = getattr(ep, "dist", None)
        origin = (dist.name if dist else "?", dist.version if dist else "?")
        try:
            module = ep.load()
            pm.register(module, name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not take aird down
            broken.append(Broken(ep.name, origin[0], _one_line(exc)))
            continue
        try:   # a hookimpl whose name matches no hook (a misspelling) would otherwise be silently ignored
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            pm.unregister(name=ep.name)
            broken.append(Broken(ep.name, origin[0], f"implements a hook aird does not have: {_one_line(exc)}"))
            continue
        origins[ep.name] = origin

    items: list[Registered] = []
    for kind, proto in KINDS.items():
        caller = getattr(pm.hook, f"aird_register_{kind}s")
        for impl in caller.get_hookimpls():
            origin, version = origins.get(impl.plugin_name, ("?", "?"))
            found: list[Any] = []
            try:
                impl.function(register=found.append)
            except Exception as exc:
                broken.append(Broken(impl.plugin_name, origin, _one_line(exc)))
                continue
            for obj in found:
                name = getattr(obj, "name", None)
                if not isinstance(obj, proto) or not name:
                    broken.append(Broken(impl.plugin_name, origin, f"registered a {kind} without the {proto.__name__} interface"))
                elif any(r.kind == kind and r.name == name for r in items):
                    broken.append(Broken(impl.plugin_name, origin, f"{kind} name {name!r} is already taken"))
                else:
                    items.append(Registered(kind, name, obj, impl.plugin_name, origin, version))
    return PluginRegistry(items, broken)


LOAD_PLUGINS_ENV = "AIRD_LOAD_PLUGINS"


def _wanted(ep: md.EntryPoint) -> bool:
    """Built-ins always; a third party's entry point unless ``$AIRD_LOAD_PLUGINS`` is set and names neither it
    nor its distribution (comma-separated; set and empty: no third-party plugin loads)."""
    dist = getattr(getattr(ep, "dist", None), "name", "")
    if dist == "aird":
        return True
    chosen = os.environ.get(LOAD_PLUGINS_ENV)
    if chosen is None:
        return True
    names = {x.strip() for x in chosen.split(",") if x.strip()}
    return ep.name in names or dist in names


def _entry_points() -> list[md.EntryPoint]:
    eps = [ep for ep in md.entry_points(group=ENTRY_POINT_GROUP) if _wanted(ep)]
    # built-ins first, then third parties by name: a stable order for listings and name clashes
    return sorted(eps, key=lambda ep: (getattr(ep.dist, "name", "") != "aird", ep.name))


@lru_cache(maxsize=1)
def plugin_registry() -> PluginRegistry:
    return build_registry(_entry_points())


def get(kind: str, name: str) -> Any:
    return plugin_registry().get(kind, name)
