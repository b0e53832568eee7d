"""`aird repair`: AIRD — re-induce the original model's refusal direction in a compressed model with an edit
of one residual-writing matrix of one layer.

Three choices, each explicit and recorded:
- the layer whose matrices are edited: by default the one just below the source layer of the chosen direction
  (the compressed model's, when its probe is given, else the original's), so that the edit lands in the
  residual stream where the direction is read; ``auto`` searches the three layers below the source;
- the matrix: attention out (o_proj), MLP down (down_proj), or both;
- α: given, or ``auto``: the smallest α on a grid that brings the harmful-validation refusal rate back to the
  original model's while the harmless-validation refusal rate stays within 2 points of it (or of the
  compressed model's own rate, when compression already raised it: the guard uses the larger, and both are
  reported).
The refusal rate here is the share of prompts whose refusal score (log-odds of the refusal tokens) is > 0:
cheap, generation-free, and the quantity the probe's filter uses. Each trial runs only the layers from the
edited one up, from residuals cached once.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from aird.core import hooks, plugins
from aird.core.artifacts import Run, Stopwatch, finished_model_folder, write_jsonl
from aird.core.diff import open_probe
from aird.core.directions import refusal_scores
from aird.core.errors import AirdError
from aird.core.forward import make_batches, run_model
from aird.core.loading import LoadedModel, save_model_folder
from aird.core.measure import decoder_linear_weights, summarize
from aird.core.probe import format_prompts, config_from_record, load_prompt_sets
from aird.core.progress import Reporter

REPAIR_JSONL = "repair.jsonl"
ALPHA_GRID = (0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)
NON_SEMANTIC = ("device", "data_dir", "threads", "batch_size")


@dataclass
class RepairConfig:
    method: str = "aird"
    layer: int | str | None = None      # None: source − 1; int; "auto"
    matrix: str = "both"                 # attn | mlp | both
    alpha: float | str = "auto"
    guard: float = 0.02                  # harmless refusal rate may rise at most this much
    compressed_probe: str | None = None
    batch_size: int = 16
    data_dir: str | None = None
    device: str | None = None

    def matrices(self) -> list[str]:
        if self.matrix not in ("attn", "mlp", "both"):
            raise AirdError(f"--matrix must be attn, mlp or both, not {self.matrix!r}.")
        return ["attn", "mlp"] if self.matrix == "both" else [self.matrix]


class _Evaluator:
    """Refusal rates of the validation prompts, running the model from a cached layer on."""

    def __init__(self, lm: LoadedModel, harmful: list[str], harmless: list[str], layers: list[int], batch_size: int):
        self.lm = lm
        self.n_h = len(harmful)
        self.batches = make_batches(lm, harmful + harmless, batch_size)
        self.ids = lm.adapter.refusal_token_ids(lm.tokenizer)
        self.cache: list[dict[int, torch.Tensor]] = []
        with torch.inference_mode():
            for b in self.batches:
                store: dict[int, torch.Tensor] = {}
                with hooks.capture_resid(lm, store, None, layers=layers):
                    run_model(lm, b)
                self.cache.append(store)

    def rates(self, from_layer: int) -> dict:
        n = sum(len(b.idx) for b in self.batches)
        scores = torch.empty(n)
        with torch.inference_mode():
            for b, store in zip(self.batches, self.cache):
                with hooks.start_at(self.lm, from_layer, store[from_layer]):
                    scores[b.idx] = refusal_scores(run_model(self.lm, b)[:, -1, :].cpu(), self.ids)
        h, s = scores[: self.n_h], scores[self.n_h :]
        return {"harmful_refusal_rate": (h > 0).float().mean().item(), "harmless_refusal_rate": (s > 0).float().mean().item(),
                "harmful_refusal_score": h.mean().item(), "harmless_refusal_score": s.mean().item()}


def _targets(lm: LoadedModel, layer: int, which: list[str]) -> list[torch.nn.Linear]:
    if not lm.adapter.projections_write_residual:
        raise AirdError(f"the {lm.adapter.family} family normalizes block outputs before the residual; "
                        "a rank-one edit of its projections does not write along r̂ (not supported).")
    block = lm.adapter.layers(lm.model)[layer]
    return [lm.adapter.out_proj(block, w) for w in which]


def _apply(repair, mats: list[torch.nn.Linear], unit: torch.Tensor, alpha: float) -> list[torch.Tensor]:
    saved = []
    with torch.no_grad():
        for m in mats:
            saved.append(m.weight.data.clone())
            m.weight.data.copy_(repair.edit(m.weight.data, unit.to(m.weight.device), alpha))
    return saved


def _restore(mats: list[torch.nn.Linear], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for m, w in zip(mats, saved):
            m.weight.data.copy_(w)


def run_repair(lm: LoadedModel, reference: Path, cfg: RepairConfig, out: Path, force: bool = False,
               reporter: Reporter | None = None) -> dict:
    rep = reporter or Reporter()
    repair = plugins.get("repair", cfg.method)
    which = cfg.matrices()
    ref = open_probe(reference)
    n_layers = lm.n_layers
    if ref.summary["n_layers"] != n_layers or ref.chosen.shape[-1] != lm.model.config.hidden_size:
        raise AirdError("the reference probe was made on a model of another shape than the one being repaired.")
    src = ref.summary["source"]["layer"]
    if cfg.compressed_probe:
        src = open_probe(Path(cfg.compressed_probe)).summary["source"]["layer"]
    if cfg.layer == "auto":
        layers = sorted({max(0, src - k) for k in (1, 2, 3)})
    elif cfg.layer is None:
        layers = [max(0, src - 1)]
    else:
        layer = int(cfg.layer)
        if not 0 <= layer < n_layers:
            raise AirdError(f"--layer must be in [0, {n_layers - 1}], got {layer}.")
        layers = [layer]
    if cfg.alpha == "auto":
        alphas = list(ALPHA_GRID)
    else:
        try:
            alphas = [float(cfg.alpha)]
        except ValueError:
            raise AirdError(f"--alpha must be a number or auto, not {cfg.alpha!r}.") from None
        if not alphas[0] > -1:
            raise AirdError("--alpha must be greater than -1 (α = -1 removes the direction entirely).")

    out = Path(out)
    jsonl = out / REPAIR_JSONL
    config = {"model_path": lm.path, "reference": str(ref.path), **asdict(cfg), "layers": layers, "alphas": alphas}
    done = finished_model_folder(out, REPAIR_JSONL, "repair.summary", config, force, ignore=NON_SEMANTIC)
    if done is not None:
        return {**done, "resumed": True}

    run = Run("repair", lm.spec, config, ref.summary["seed"])
    sw = Stopwatch(run.timings)
    t0 = time.perf_counter()
    unit = (ref.chosen.double() / ref.chosen.double().norm()).float()
    pcfg = config_from_record(ref.summary["config"])
    if cfg.data_dir:
        pcfg.data_dir = cfg.data_dir
    sets = load_prompt_sets(pcfg)
    harmful = format_prompts(lm, sets.harmful_val, pcfg.system_prompt)
    harmless = format_prompts(lm, sets.harmless_val, pcfg.system_prompt)
    original = {"harmful_refusal_rate": ref.summary["baseline"]["harmful_refused_share"],
                "harmless_refusal_rate": ref.summary["baseline"]["harmless_refused_share"]}
    before = {k: v.detach().clone() for k, v in decoder_linear_weights(lm.model.state_dict()).items()}
    with sw("validation_cache"):
        ev = _Evaluator(lm, harmful, harmless, layers, cfg.batch_size)
        compressed = ev.rates(layers[0])
    guard = max(original["harmless_refusal_rate"], compressed["harmless_refusal_rate"]) + cfg.guard
    target = original["harmful_refusal_rate"]
    trials = []
    with sw("search"), rep.stage("searching layer and α", len(layers) * len(alphas)) as advance:
        for layer in layers:
            mats = _targets(lm, layer, which)
            for alpha in alphas:
                saved = _apply(repair, mats, unit, alpha)
                try:
                    r = ev.rates(layer)
                finally:
                    _restore(mats, saved)
                r.update(layer=layer, alpha=alpha, reaches_target=r["harmful_refusal_rate"] >= target,
                         within_guard=r["harmless_refusal_rate"] <= guard + 1e-9)
                trials.append(r)
                advance(1)
    ok = [t for t in trials if t["reaches_target"] and t["within_guard"]]
    if ok:
        best = min(ok, key=lambda t: (t["alpha"], -t["harmful_refusal_rate"]))
    else:
        guarded = [t for t in trials if t["within_guard"]]
        if guarded:  # the most refusal the guard allows
            best = max(guarded, key=lambda t: (t["harmful_refusal_rate"], -t["alpha"]))
        else:        # every trial over-refuses: the mildest edit, never the one that refuses everything
            best = min(trials, key=lambda t: (t["alpha"], t["harmless_refusal_rate"]))
        rep.note("no α reached the original harmful refusal rate within the over-refusal guard; "
                 f"taking layer {best['layer']}, α {best['alpha']} (flagged: target_reached false)")
    mats = _targets(lm, best["layer"], which)
    _apply(repair, mats, unit, best["alpha"])
    with sw("save"):
        save_model_folder(lm.model, lm.tokenizer, out, provenance={"repaired_from": lm.path, "reference": str(ref.path),
                                                                    "method": repair.name})
    after_w = decoder_linear_weights(lm.model.state_dict())
    sb, sa = summarize(before), summarize(after_w)
    lay_b = next(r for r in sb["per_layer"] if r["layer"] == best["layer"])
    lay_a = next(r for r in sa["per_layer"] if r["layer"] == best["layer"])
    edited = {name: {"before": lay_b["matrices"][name]["sparsity"], "after": m["sparsity"]}
              for name, m in lay_a["matrices"].items() if name.endswith(("o_proj", "down_proj"))}
    summary = run.record(
        "repair.summary", method=repair.name, layer=best["layer"], matrix=cfg.matrix, alpha=best["alpha"],
        source_layer=src, reference_source=ref.summary["source"],
        layer_sparsity={"before": lay_b["sparsity"], "after": lay_a["sparsity"], "matrices": edited},
        sparsity={"before": sb["sparsity"], "after": sa["sparsity"]},
        validation={"original": original, "compressed": compressed, "repaired": {k: best[k] for k in (
            "harmful_refusal_rate", "harmless_refusal_rate", "harmful_refusal_score", "harmless_refusal_score")},
            "target_harmful_refusal_rate": target, "harmless_guard": guard, "target_reached": bool(ok),
            "trials": trials, "n_harmful": len(harmful), "n_harmless": len(harmless)},
        seconds=round(time.perf_counter() - t0, 3), timings=dict(run.timings), out=str(out), path=str(out),
    )
    write_jsonl(jsonl, [summary])
    return summary
