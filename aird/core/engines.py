"""Which engine generates, and the refusal score beside its answers, whatever the engine.

Engines are plugins (``aird_register_engines``; built in: ``hf`` and ``vllm``, aird/plugins/engines.py).
``--engine auto`` takes the first engine, by ``auto_rank``, that can run the loaded model here, and says in one
line why it passed over the others; a named engine that cannot run the model is one clear error.

The refusal score (log-odds of the refusal tokens at the first generated position) is computed by aird from the
loaded model whatever the engine: from the logits ``hf`` returns, or from one batched prefill of the prompts when
the engine returns none. So an engine changes the answers at most, never the score's definition.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from aird.core import plugins
from aird.core.directions import refusal_scores
from aird.core.configs import default_engine  # noqa: F401  (re-exported)
from aird.core.errors import AirdError
from aird.core.forward import make_batches, run_model
from aird.core.loading import LoadedModel

@dataclass
class Choice:
    engine: Any
    note: str | None      # why ``auto`` passed over a faster engine, or None


def choose(name: str, lm: LoadedModel, n_prompts: int | None = None) -> Choice:
    """The engine plugin to use for ``lm``: ``name`` itself, or for ``auto`` the best that can run it and whose
    start-up the work is worth (an engine's ``min_prompts``: below it, its start-up costs more than its speed
    saves, as measured in docs/benchmarks.md)."""
    reg = plugins.plugin_registry()
    if name != "auto":
        engine = reg.get("engine", name)
        why = engine.unavailable(lm)
        if why:
            raise AirdError(f"engine {name!r} cannot run this model: {why}.")
        return Choice(engine, None)
    passed = []
    for r in sorted(reg.of("engine"), key=lambda r: (getattr(r.obj, "auto_rank", 50), r.name)):
        why = r.obj.unavailable(lm)
        least = getattr(r.obj, "min_prompts", 0)
        if why is None and n_prompts is not None and n_prompts < least:
            why = f"{n_prompts} prompts are fewer than its start-up is worth ({least})"
        if why is None:
            note = "; ".join(f"not {n}: {w}" for n, w in passed) or None
            return Choice(r.obj, f"engine {r.name} ({note})" if note else None)
        passed.append((r.name, why))
    raise AirdError("no generation engine can run this model: " + "; ".join(f"{n}: {w}" for n, w in passed) + ".")


@contextmanager
def session(name: str, lm: LoadedModel, options: dict | None = None, say=None,
            n_prompts: int | None = None) -> Iterator[Any]:
    """An open engine session for ``lm`` (closed on exit) to answer ``n_prompts`` prompts. ``say(line)`` hears
    why ``auto`` passed an engine over."""
    choice = choose(name, lm, n_prompts)
    if choice.note and say:
        say(choice.note)
    s = choice.engine.open(lm, dict(options or {}))
    s.info = {**getattr(s, "info", {}), "engine": choice.engine.name}
    s.chunk = getattr(choice.engine, "chunk", 64)
    try:
        yield s
    finally:
        s.close()


def prompt_refusal_scores(lm: LoadedModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """Refusal score of the next-token distribution after each chat-formatted text (one prefill, batched the
    way ``hf`` generation batches, so the numbers match its first-step logits)."""
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    out = torch.empty(len(texts))
    with torch.inference_mode():
        for b in make_batches(lm, texts, batch_size):
            out[b.idx] = refusal_scores(run_model(lm, b)[:, -1, :].cpu(), ids)
    return out


def _from_top_logprobs(top: dict[int, float] | None, ids: list[int]) -> float | None:
    """The refusal score from an engine's top log-probabilities at the first position, when every refusal token
    is among them (exact); None otherwise."""
    import math

    if not top or any(i not in top for i in ids):
        return None
    lp = min(float(torch.logsumexp(torch.tensor([top[i] for i in ids], dtype=torch.float64), 0)), -1e-12)
    return lp - math.log(-math.expm1(lp))


def answer(sess, lm: LoadedModel, texts: list[str], max_new_tokens: int, batch_size: int, progress=None):
    """The session's greedy answers to ``texts`` and each one's refusal score: from the first-step logits (hf),
    else from the engine's top log-probabilities where every refusal token is among them (vLLM returns its top
    20), else from one hf prefill of the prompts left."""
    gens = sess.generate(texts, max_new_tokens, progress=progress)
    ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    if all(g.first_logits is not None for g in gens):
        return gens, refusal_scores(torch.stack([g.first_logits for g in gens]), ids)
    scores = torch.empty(len(texts))
    missing = []
    for k, g in enumerate(gens):
        v = _from_top_logprobs(g.first_logprobs, ids)
        if v is None:
            missing.append(k)
        else:
            scores[k] = v
    if missing:
        scores[missing] = prompt_refusal_scores(lm, [texts[k] for k in missing], batch_size)
    return gens, scores
