"""Third-party plugins installed from their own folders, as a user installs them (pip, entry points)."""

import json
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
from helpers import run_aird
import torch

pytestmark = pytest.mark.slow   # pip installs of test packages and CLI subprocesses

REPO = Path(__file__).resolve().parents[1]


def pip_install(folder: Path, target: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                          "--target", str(target), str(folder)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr


def aird(*args, path=None):
    # conftest keeps the machine's plugins out; these tests install their own into ``path``
    return run_aird(*args, path=path, load_plugins=True, timeout=600)


def listed(res):
    assert res.returncode == 0, res.stderr
    return {(r.get("kind"), r.get("name") or r.get("plugin")): r for r in map(json.loads, res.stdout.splitlines())}


def make_package(root: Path, name: str, module_source: str) -> Path:
    pkg = root / name
    mod = name.replace("-", "_")
    (pkg / mod).mkdir(parents=True)
    (pkg / mod / "__init__.py").write_text(textwrap.dedent(module_source))
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "1.2.3"
        [project.entry-points.aird]
        {mod} = "{mod}"
        [tool.setuptools]
        packages = ["{mod}"]
    """))
    return pkg


WORKING = '''
import torch
from aird import hookimpl

class EveryOther:
    name = "every-other"
    kind = "pruning"
    description = "zero every other input column"
    params = {}
    needs_calibration = False

    @torch.no_grad()
    def compress(self, lm, params, calibration):
        for layer in lm.adapter.layers(lm.model):
            for m in layer.modules():
                if isinstance(m, torch.nn.Linear):
                    m.weight[:, ::2] = 0
        return {"library": "aird-everyother"}

@hookimpl
def aird_register_compressors(register):
    register(EveryOther())
'''


def test_installed_plugin_appears_runs_and_disappears(refusing, tmp_path):
    model_dir, data = refusing
    target = tmp_path / "site"
    pip_install(make_package(tmp_path / "src", "aird-everyother", WORKING), target)
    plugins = listed(aird("plugins", "--json", path=target))
    entry = plugins[("compressor", "every-other")]
    assert entry["origin"] == "aird-everyother" and entry["version"] == "1.2.3" and not entry["builtin"]
    out = tmp_path / "pruned"
    res = aird("compress", "--model", str(model_dir), "--method", "every-other", "--out", str(out), "--data-dir",
               str(data), path=target)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["method"] == "every-other" and summary["sparsity"] == pytest.approx(0.5)
    shutil.rmtree(target)  # uninstalled
    assert ("compressor", "every-other") not in listed(aird("plugins", "--json", path=target))


def test_broken_plugin_is_one_line_and_other_commands_work(tmp_path):
    target = tmp_path / "site"
    pip_install(make_package(tmp_path / "src", "aird-broken", "import no_such_module_for_aird\n"), target)
    res = aird("plugins", "--json", path=target)
    plugins = listed(res)
    err = [r for r in plugins.values() if r["record"] == "plugin.error"]
    assert len(err) == 1 and err[0]["plugin"] == "aird_broken" and "ModuleNotFoundError" in err[0]["error"]
    assert sum("failed to load" in line for line in res.stderr.splitlines()) == 1
    assert ("probe", "diff-in-means") in plugins
    assert aird("models", "--json", path=target).returncode == 0


def test_autogptq_plugin_installs_and_explains_itself(refusing, tmp_path):
    model_dir, data = refusing
    target = tmp_path / "site"
    pip_install(REPO / "plugins" / "aird-autogptq", target)
    plugins = listed(aird("plugins", "--json", path=target))
    assert plugins[("compressor", "autogptq")]["origin"] == "aird-autogptq"
    res = aird("compress", "--model", str(model_dir), "--method", "autogptq", "--bits", "4", "--group-size", "32",
               "--out", str(tmp_path / "q"), "--data-dir", str(data), path=target)
    try:
        import auto_gptq  # noqa: F401
    except Exception:
        assert res.returncode == 2 and "Traceback" not in res.stderr
        assert "auto-gptq cannot run" in res.stderr and "--method gptq" in res.stderr
    else:  # pragma: no cover - only where auto-gptq works
        assert res.returncode == 0, res.stderr


def test_autogptq_glue_with_a_stand_in_solver(refusing, monkeypatch):
    """The plugin's layer-by-layer flow, with a stand-in for auto-gptq's GPTQ solver (RTN on 16 levels)."""
    monkeypatch.syspath_prepend(str(REPO / "plugins" / "aird-autogptq"))   # undone after the test
    monkeypatch.delitem(sys.modules, "aird_autogptq", raising=False)
    import aird_autogptq

    seen = []

    class FakeGPTQ:
        def __init__(self, layer):
            self.layer, self.rows = layer, 0
            self.quantizer = types.SimpleNamespace(configure=lambda *a, **k: None)

        def add_batch(self, inp, out):
            self.rows += inp.reshape(-1, inp.shape[-1]).shape[0]

        def fasterquant(self, **kw):
            w = self.layer.weight.data
            scale = w.abs().amax(1, keepdim=True) / 7
            w.copy_((w / scale).round().clamp(-8, 7) * scale)
            seen.append(self.rows)

        def free(self):
            pass

    monkeypatch.setitem(sys.modules, "auto_gptq", types.ModuleType("auto_gptq"))
    monkeypatch.setitem(sys.modules, "auto_gptq.quantization", types.SimpleNamespace(GPTQ=FakeGPTQ))
    from aird.core.compress import Calibration
    from aird.core.loading import load_model

    lm = load_model(str(refusing[0]), device="cpu")
    calib = Calibration(["x"], [[5, 6, 7, 8], [9, 10, 11]], "test")
    aird_autogptq.AutoGPTQ().compress(lm, {"bits": 4, "group_size": None}, calib)
    n_linear = sum(isinstance(m, torch.nn.Linear) for layer in lm.adapter.layers(lm.model) for m in layer.modules())
    # the glue's own work: every decoder Linear gets a solver, fed every calibration token (3 + 4), once
    assert len(seen) == n_linear and all(rows == 7 for rows in seen)


def test_the_worked_example_plugin_installs_and_runs_end_to_end(refusing, tmp_path, monkeypatch):
    """plugins/aird-example, the package docs/plugins.md builds: pip-installed, listed, and used by compress and
    eval like a built-in."""
    model_dir, data = refusing
    target = tmp_path / "site"
    pip_install(REPO / "plugins" / "aird-example", target)
    plugins = listed(aird("plugins", "--json", path=target))
    assert plugins[("compressor", "random")]["origin"] == "aird-example"
    assert plugins[("scorer", "prefix")]["origin"] == "aird-example"
    out = tmp_path / "random30"
    res = aird("compress", "--model", str(model_dir), "--method", "random", "--sparsity", "0.3", "--out", str(out),
               "--data-dir", str(data), path=target)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["method"] == "random" and summary["sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert summary["info"]["library"] == "aird-example" and summary["calibration"] is None
    res = aird("eval", "-m", str(out), "--harmful", "harmful_val", "--benign", "harmless_val", "--seen", "none",
               "--limit", "6", "--max-new-tokens", "4", "--scorer", "prefix", "--judge", "substring", "--data-dir",
               str(data), "--out", str(tmp_path / "e"), path=target)
    assert res.returncode == 0, res.stderr
    recs = [json.loads(x) for x in (tmp_path / "e" / "eval.jsonl").read_text().splitlines()]
    prompts = [r for r in recs if r["record"] == "eval.prompt"]
    monkeypatch.syspath_prepend(str(target))
    from aird_example import PrefixJudge   # the installed copy's judge, applied by hand to the same answers
    assert len(prompts) == 12 and [r["refused"] for r in prompts] == PrefixJudge().refused(
        [r["prompt"] for r in prompts], [r["completion"] for r in prompts])
    assert all("substring" in r["judges"] for r in prompts)


def test_every_hook_and_plugin_kind_is_documented():
    """docs/plugins.md has a section per hook, naming every member of the kind it registers."""
    from aird.core.hookspecs import Specs
    from aird.core.plugins import KINDS

    doc = (REPO / "docs" / "plugins.md").read_text()
    hooks = [n for n in vars(Specs) if n.startswith("aird_register_")]
    assert len(hooks) == len(KINDS)
    for hook in hooks:
        assert f"## `{hook}`" in doc, hook
    for kind, proto in KINDS.items():
        section = doc.split(f"## `aird_register_{kind}s`", 1)[1].split("\n## ", 1)[0]
        members = [m for m in (*getattr(proto, "__annotations__", {}), *vars(proto)) if not m.startswith("_")]
        for m in members:
            assert f"`{m}" in section, (kind, m)
