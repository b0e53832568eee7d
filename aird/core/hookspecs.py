"""pluggy hook specifications: the plugin kinds a package can add to aird (compressor, probe, scorer, repair,
engine).

A plugin is a module (or object) listed under the ``aird`` entry-point group that implements one or more of
these hooks; aird's own compressors, probes and scorers are registered exactly the same way.

    from aird import hookimpl

    @hookimpl
    def aird_register_compressors(register):
        register(MyCompressor())
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import pluggy

PROJECT = "aird"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@runtime_checkable
class Compressor(Protocol):
    """Prunes or quantizes a loaded model in place. ``name`` is what ``aird compress --method`` takes.

    ``compress(lm, params, calibration)`` edits ``lm.model`` (an ``aird.core.loading.LoadedModel``) in place and
    returns a dict (or None) recorded as ``info`` in compress.jsonl. ``params`` holds the plugin's ``params``
    defaults overridden by the options the user gave (``--sparsity``, ``--pattern``, ``--bits``,
    ``--group-size``), already validated; ``calibration`` is an ``aird.core.compress.Calibration`` (its
    ``texts`` and tokenized ``input_ids``), or None when ``needs_calibration`` is False. aird then writes the
    model folder and measures the achieved sparsity and bits from the written weights.

    Optional attributes, read when present:
    ``kind`` ("pruning" | "quantization"): how the study groups it;
    ``params`` (dict): the options it takes and their defaults (an option not in it is refused);
    ``needs_calibration`` (bool, default True);
    ``bits_allowed`` (tuple, default (2, 3, 4, 8)): the ``--bits`` values it accepts;
    ``save_compressed(lm, folder) -> str``: writes the packed compressed-tensors folder (``--format
    compressed-tensors``) and returns the format's name."""

    name: str
    description: str

    def compress(self, lm: Any, params: dict, calibration: Any) -> dict | None: ...


@runtime_checkable
class Probe(Protocol):
    """Turns activations of harmful and harmless prompts ([N, layers, positions, d]) into one candidate
    direction per layer and position ([layers, positions, d])."""

    name: str
    description: str

    def directions(self, harmful: Any, harmless: Any) -> Any: ...


@runtime_checkable
class Scorer(Protocol):
    """Judges completions: True where the model refused. Optional: ``uses_scores = True`` (``refused`` is then
    also given ``scores=``, the answering model's first-token refusal score per answer), ``prepare()`` (load what
    it needs before any answer is generated), ``configure(**options)`` (``judge_model``, ``device``) and
    ``refusal_probabilities(prompts, completions) -> list[float]`` (its confidence, P(refusal) per answer: eval
    then decides P > 0.5 and records P as ``p_refusal``)."""

    name: str
    description: str

    def refused(self, prompts: list[str], completions: list[str]) -> list[bool]: ...


@runtime_checkable
class Repair(Protocol):
    """Edits one residual-writing matrix W ([d_model, d_in]) so that it writes more along the unit direction
    r̂ ([d_model]); ``alpha`` is the strength. Returns the new matrix.

    Repairs are their own plugin kind rather than compressors that take a reference: they need a reference
    direction, a layer and a strength, which no compressor takes, and a registry of four plain kinds stays
    simpler than one kind whose members take different arguments."""

    name: str
    description: str
    # Optional: ``fits = True`` makes aird fit the edit to the data first (aird.core.repair.fit_rank_one) and call
    # ``edit(weight, unit, alpha, fit=u)`` with the fitted vector u for that matrix; ``alpha_grid`` (a tuple)
    # replaces the α grid that --alpha auto searches; ``layer_ranking`` ("selective" or "gap") is how --layer auto
    # chooses the layer for this method (default "selective": the matrices that already write r̂ most selectively).
    # ``compensates = True`` (with ``rank`` and ``ridge``) makes aird fit every block in turn instead
    # (aird.core.compensate) and call ``edit(weight, None, alpha, fit=ΔW)`` with each writer's fitted change;
    # with ``masked = True`` (and ``iterations``) every linear of the block is refitted on its own non-zeros
    # instead, and ``edit`` gets each linear's change.

    def edit(self, weight: Any, unit: Any, alpha: float) -> Any: ...


@runtime_checkable
class EngineSession(Protocol):
    """One model opened by an engine: greedy answers to chat-formatted texts, in the caller's order."""

    def generate(self, texts: list[str], max_new_tokens: int, progress: Any = None) -> list[Any]: ...

    def close(self) -> None: ...


@runtime_checkable
class Engine(Protocol):
    """Generates greedy answers for ``eval`` and repair's generate judge (built in: ``hf``, ``vllm``).

    ``unavailable(lm)`` says in one sentence why the engine cannot run this loaded model here (a package not
    installed, a format it cannot read), or returns None; ``open(lm, options)`` returns an EngineSession whose
    ``generate`` returns ``aird.core.generate.Generation`` objects (``first_logits`` may be None: aird then
    takes the refusal score from one prefill of the loaded model, so the score is the same whichever engine
    answered). ``options`` holds ``batch_size``, ``seed``, ``work_tokens`` (prompts × max new tokens, a hint of the
    job's size) and the user's pass-through engine options. ``auto_rank`` orders the engines ``--engine auto``
    tries (lowest first)."""

    name: str
    description: str
    auto_rank: int

    def unavailable(self, lm: Any) -> str | None: ...

    def open(self, lm: Any, options: dict) -> EngineSession: ...


class Specs:
    @hookspec
    def aird_register_compressors(self, register: Callable[[Compressor], None]) -> None:
        """Register compressor plugins by calling ``register(obj)`` for each."""

    @hookspec
    def aird_register_probes(self, register: Callable[[Probe], None]) -> None:
        """Register probe plugins by calling ``register(obj)`` for each."""

    @hookspec
    def aird_register_repairs(self, register: Callable[[Repair], None]) -> None:
        """Register repair plugins by calling ``register(obj)`` for each."""

    @hookspec
    def aird_register_engines(self, register: Callable[[Engine], None]) -> None:
        """Register generation-engine plugins by calling ``register(obj)`` for each."""

    @hookspec
    def aird_register_scorers(self, register: Callable[[Scorer], None]) -> None:
        """Register scorer plugins by calling ``register(obj)`` for each."""
