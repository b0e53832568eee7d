import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import tiny  # noqa: E402

torch.set_num_threads(2)
# tiny models are not worth vLLM's minute of start-up: tests (and the CLI subprocesses they start) generate with hf
# unless a test names its engine
os.environ["AIRD_ENGINE"] = "hf"
# likewise the default judge (a classifier over the default model's activations) would load the 0.5B model in every
# eval: tests judge with the reference substrings unless a test names its judge
os.environ["AIRD_SCORER"] = "substring"
# the machine's own third-party aird plugins never load in tests (test_third_party.py installs its own and lets
# them load in its subprocesses)
os.environ["AIRD_LOAD_PLUGINS"] = ""


@pytest.fixture(scope="session")
def refusing(tmp_path_factory):
    """The trained tiny refusing model, saved as a model folder, and a synthetic data directory."""
    model, tok = tiny.refusing_model()
    root = tmp_path_factory.mktemp("refusing")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = tiny.write_data_dir(root / "data")
    return root / "model", data


@pytest.fixture()
def refusing_lm(refusing):
    from aird.core.loading import load_model

    return load_model(str(refusing[0]), device="cpu")


def wrap(model, tok, spec="tiny"):
    from aird.core.loading import wrap_model

    return wrap_model(model, tok, spec=spec, device=torch.device("cpu"))


class FirstWordScorer:
    """A test judge: the tiny refusing model refuses by starting with "I", which the reference substrings never
    match."""
    name = "first-word"
    description = "refused when the answer starts with 'I' (tests)"

    def refused(self, prompts, completions):
        return [c.strip().startswith("I") for c in completions]


@pytest.fixture()
def register_plugin(monkeypatch):
    """Register a test plugin through the same pluggy hooks a third party implements (an object or module with
    ``@hookimpl`` functions), beside the built-ins, for one test: ``register_plugin(obj)`` returns the registry."""
    import types

    from aird.core import plugins

    def register(plugin, name: str = "test-plugin"):
        ep = types.SimpleNamespace(name=name, dist=None, load=lambda: plugin)
        reg = plugins.build_registry([*plugins._entry_points(), ep])
        assert not reg.broken, reg.broken
        monkeypatch.setattr(plugins, "plugin_registry", lambda: reg)
        return reg

    return register


class FirstWordPlugin:
    """A test plugin registering FirstWordScorer through the scorer hook: ``register_plugin(FirstWordPlugin())``."""

    from aird.core.hookspecs import hookimpl

    @hookimpl
    def aird_register_scorers(self, register):
        register(FirstWordScorer())
