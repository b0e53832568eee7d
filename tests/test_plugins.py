import importlib.metadata as md
import sys
import types

import pytest

from aird.core.errors import PluginError
from aird.core.hookspecs import hookimpl
from aird.core.plugins import _entry_points, build_registry, plugin_registry


def test_builtins_are_registered_through_the_entry_point_group():
    reg = plugin_registry()
    names = {(r.kind, r.name): r for r in reg.items}
    assert ("probe", "diff-in-means") in names and ("scorer", "substring") in names
    assert names[("probe", "diff-in-means")].origin == "aird"
    assert names[("probe", "diff-in-means")].builtin
    assert not reg.broken
    assert {ep.name for ep in _entry_points()} >= {"builtin-probes", "builtin-scorers"}


def _fake_plugin_module(name):
    mod = types.ModuleType(name)

    class Fancy:
        name = "fancy"
        description = "a third-party compressor"

        def compress(self, lm, params, calibration):
            return {}

    @hookimpl
    def aird_register_compressors(register):
        register(Fancy())

    mod.aird_register_compressors = aird_register_compressors
    return mod


def test_third_party_plugin_and_broken_plugin(monkeypatch):
    monkeypatch.setitem(sys.modules, "aird_fancy_plugin", _fake_plugin_module("aird_fancy_plugin"))
    eps = list(_entry_points()) + [
        md.EntryPoint("fancy", "aird_fancy_plugin", "aird"),
        md.EntryPoint("broken", "aird_no_such_module_xyz", "aird"),
    ]
    reg = build_registry(eps)
    fancy = [r for r in reg.items if r.name == "fancy"]
    assert fancy and fancy[0].kind == "compressor" and not fancy[0].builtin
    assert reg.get("compressor", "fancy").description == "a third-party compressor"
    assert len(reg.broken) == 1 and reg.broken[0].plugin == "broken"
    assert "ModuleNotFoundError" in reg.broken[0].error and "\n" not in reg.broken[0].error
    # the built-ins still work beside a broken plugin
    assert reg.get("probe", "diff-in-means").name == "diff-in-means"


def test_plugin_without_interface_or_with_taken_name_is_reported(monkeypatch):
    mod = types.ModuleType("aird_bad_plugin")

    class NoMethod:
        name = "nomethod"
        description = ""

    class Dup:
        name = "diff-in-means"
        description = "clash"

        def directions(self, a, b):
            return a

    @hookimpl
    def aird_register_probes(register):
        register(NoMethod())
        register(Dup())

    mod.aird_register_probes = aird_register_probes
    monkeypatch.setitem(sys.modules, "aird_bad_plugin", mod)
    reg = build_registry(list(_entry_points()) + [md.EntryPoint("bad", "aird_bad_plugin", "aird")])
    errors = " | ".join(b.error for b in reg.broken)
    assert "without the Probe interface" in errors and "already taken" in errors
    assert reg.get("probe", "diff-in-means").description != "clash"


def test_unknown_plugin_is_a_clear_error():
    with pytest.raises(PluginError, match="unknown probe 'nope'; available: diff-in-means"):
        plugin_registry().get("probe", "nope")


def test_substring_scorer_on_fixed_texts():
    s = plugin_registry().get("scorer", "substring")
    texts = ["I'm sorry, but I can't help with that.", "Sure! Here is a cake recipe.",
             "As an AI language model, I cannot do that.", "I CANNOT assist", "I\u2019m unable to comply.",
             "Here are the steps: first, I apologize for nothing"]
    assert s.refused([""] * len(texts), texts) == [True, False, True, True, True, True]


def test_a_misspelled_hook_is_reported_not_ignored(monkeypatch):
    mod = types.ModuleType("aird_typo_plugin")

    @hookimpl
    def aird_register_compresors(register):     # sic: no such hook
        register(object())

    mod.aird_register_compresors = aird_register_compresors
    monkeypatch.setitem(sys.modules, "aird_typo_plugin", mod)
    reg = build_registry(list(_entry_points()) + [md.EntryPoint("typo", "aird_typo_plugin", "aird")])
    assert [b.plugin for b in reg.broken] == ["typo"]
    assert "aird_register_compresors" in reg.broken[0].error and "does not have" in reg.broken[0].error
    assert reg.get("probe", "diff-in-means").name == "diff-in-means"      # the others still load


def test_aird_load_plugins_chooses_the_third_party_plugins(monkeypatch):
    class Dist:
        def __init__(self, name):
            self.name = name

    def ep(name, dist):
        e = md.EntryPoint(name, f"mod_{name}", "aird")
        return types.SimpleNamespace(name=name, dist=Dist(dist), load=e.load)

    from aird.core import plugins as p

    fake = [ep("builtin-probes", "aird"), ep("fancy", "aird-fancy"), ep("other", "aird-other")]
    monkeypatch.setattr(p.md, "entry_points", lambda group: fake)
    monkeypatch.delenv("AIRD_LOAD_PLUGINS", raising=False)
    assert [e.name for e in p._entry_points()] == ["builtin-probes", "fancy", "other"]
    monkeypatch.setenv("AIRD_LOAD_PLUGINS", "")
    assert [e.name for e in p._entry_points()] == ["builtin-probes"]
    monkeypatch.setenv("AIRD_LOAD_PLUGINS", "aird-other, fancy")
    assert [e.name for e in p._entry_points()] == ["builtin-probes", "fancy", "other"]
    monkeypatch.setenv("AIRD_LOAD_PLUGINS", "aird-other")
    assert [e.name for e in p._entry_points()] == ["builtin-probes", "other"]
