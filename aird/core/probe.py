"""`aird probe`: find a model's refusal direction (difference in means, selected as the reference pipeline
selects it) and write its artifacts.

Stages, each timed and each reused by a rerun with the same configuration:
  1. activations — resid_pre at every layer and post-instruction position for n harmful and n harmless
     training prompts (one batched pass, which also gives their refusal scores for filtering);
     candidate directions = the probe plugin's output, saved to directions.safetensors;
  2. baseline — refusal scores of the validation prompts (filtered like the training ones), the harmless
     residuals cached for the induce score;
  3. ranking — all candidates under the layer cutoff, by an attribution proxy of the bypass score
     (skipped with exhaustive=True);
  4. scoring — bypass, induce and KL, best-first in proxy order until top_k candidates pass the filters
     (every candidate with exhaustive=True), each written to probe.jsonl as soon as it is scored;
  5. selection — filters (layer < cutoff·L, KL < threshold, induce > threshold), lowest bypass wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from aird.core import hooks, plugins
from aird.core.artifacts import Run, Stopwatch, check_resumable, load_tensors, read_jsonl, save_tensors, write_jsonl
from aird.core.data import Prompt, load_set, sample
from aird.core.directions import refusal_scores
from aird.core.errors import AirdError, ArtifactError
from aird.core.forward import last_logits, make_batches, run_model
from aird.core.loading import LoadedModel
from aird.core.progress import Reporter
from aird.core.reliability import texts_fingerprint
from aird.core.configs import ProbeConfig  # noqa: F401  (re-exported: aird.core.probe.ProbeConfig)
from aird.core.stats import gap_removed, mcnemar_exact, mean_ci, paired_bootstrap
from aird.core.candidates import Scores, ValSet, attribution_bypass, score_candidate

PROBE_JSONL = "probe.jsonl"
DIRECTIONS = "directions.safetensors"
PLOT = "probe.png"
# options that do not change the result: a rerun with other values may resume
NON_SEMANTIC = ("batch_size", "device", "data_dir", "threads")


@dataclass
class PromptSets:
    harmful_train: list[Prompt]
    harmless_train: list[Prompt]
    harmful_val: list[Prompt]
    harmless_val: list[Prompt]


def astuple_sets(sets: PromptSets) -> tuple[list[Prompt], ...]:
    return (sets.harmful_train, sets.harmless_train, sets.harmful_val, sets.harmless_val)


def load_prompt_sets(cfg: ProbeConfig) -> PromptSets:
    def take(name: str, n: int) -> list[Prompt]:
        return sample(load_set(name, cfg.data_dir), n, cfg.seed)

    return PromptSets(
        take(cfg.harmful_train, cfg.n_train), take(cfg.harmless_train, cfg.n_train),
        take(cfg.harmful_val, cfg.n_val), take(cfg.harmless_val, cfg.n_val),
    )


def prepare_validation(lm: LoadedModel, cfg: ProbeConfig, sets: PromptSets, refusal_ids: list[int],
                       rep: Reporter | None = None) -> tuple[ValSet, dict, list[str], list[str]]:
    """Baseline refusal scores of the validation prompts, the reference's filter (harmful prompts the model
    refuses, harmless ones it answers), and everything the candidate scoring needs: the ablation batches,
    the harmless residuals at every layer (for the induce score) and the harmless baseline logits (for KL)."""
    rep = rep or Reporter()
    hv = format_prompts(lm, sets.harmful_val, cfg.system_prompt)
    bv = format_prompts(lm, sets.harmless_val, cfg.system_prompt)
    with rep.stage("baseline (validation prompts)", len(hv) + len(bv)) as advance:
        base = last_logits(lm, make_batches(lm, hv + bv, cfg.batch_size), progress=advance)
    base_scores = refusal_scores(base, refusal_ids)
    keep_hv = _filter(base_scores[: len(hv)], True, cfg.filter_prompts)
    keep_bv = _filter(base_scores[len(hv):], False, cfg.filter_prompts)
    if not keep_hv or not keep_bv:
        raise AirdError(
            f"after filtering {len(keep_hv)} harmful validation prompts are refused and {len(keep_bv)} harmless "
            "ones answered; selection needs at least one of each (try --no-filter or more --n-val)."
        )
    hv_k = [hv[i] for i in keep_hv]
    bv_k = [bv[i] for i in keep_bv]
    harmless_batches = make_batches(lm, bv_k, cfg.batch_size)
    cache: list[dict[int, torch.Tensor]] = []
    base_harmless = torch.empty((len(bv_k), base.shape[-1]))
    with torch.inference_mode():
        for b in harmless_batches:
            store: dict[int, torch.Tensor] = {}
            with hooks.capture_resid(lm, store, None):
                base_harmless[b.idx] = run_model(lm, b)[:, -1, :].cpu()
            cache.append(store)
    val = ValSet(make_batches(lm, hv_k + bv_k, cfg.batch_size), len(hv_k), harmless_batches, cache,
                 base_harmless, refusal_ids)
    baseline = {
        "harmful_refusal_score": base_scores[: len(hv)][keep_hv].mean().item(),
        "harmless_refusal_score": base_scores[len(hv):][keep_bv].mean().item(),
        "harmful_refusal_score_all": base_scores[: len(hv)].mean().item(),
        "harmless_refusal_score_all": base_scores[len(hv):].mean().item(),
        "harmful_refused_share": (base_scores[: len(hv)] > 0).float().mean().item(),
        "harmless_refused_share": (base_scores[len(hv):] > 0).float().mean().item(),
        "val_kept": {"harmful": len(keep_hv), "harmless": len(keep_bv), "harmful_sampled": len(hv),
                     "harmless_sampled": len(bv)},
    }
    return val, baseline, hv_k, bv_k


def mediation(lm: LoadedModel, cfg: ProbeConfig, sets: PromptSets, direction: torch.Tensor, refusal_ids: list[int],
              rep: Reporter | None = None) -> dict:
    """How much of refusal the chosen direction carries, on every sampled validation prompt (not only those the
    reference filter keeps): each harmful prompt's refusal score with and without the direction ablated, the
    share of the harmful–harmless gap the ablation removes (with its bootstrap interval), and how many harmful
    prompts score above 0 (the model's first token more likely a refusal than not) before and after, with the
    exact McNemar test of that change. Finding 1 of a study reads it."""
    rep = rep or Reporter()
    hv = format_prompts(lm, sets.harmful_val, cfg.system_prompt)
    bv = format_prompts(lm, sets.harmless_val, cfg.system_prompt)
    with rep.stage("mediation (all validation prompts)", 2 * len(hv) + len(bv)) as advance:
        base = refusal_scores(last_logits(lm, make_batches(lm, hv + bv, cfg.batch_size), progress=advance),
                              refusal_ids)
        abl = refusal_scores(last_logits(lm, make_batches(lm, hv, cfg.batch_size),
                                         context=lambda b: hooks.ablate(lm, direction), progress=advance),
                             refusal_ids)
    bh, bb, ah = base[: len(hv)].tolist(), base[len(hv):].tolist(), abl.tolist()
    newly_answered = sum(b > 0 >= a for b, a in zip(bh, ah))
    newly_refused = sum(a > 0 >= b for b, a in zip(bh, ah))
    change = paired_bootstrap([bh], [ah], seed=cfg.seed)
    gap = gap_removed(bh, ah, bb, seed=cfg.seed)
    return {
        "n_harmful": len(bh), "n_harmless": len(bb),
        "harmful_refusal_score": sum(bh) / len(bh), "ablated_refusal_score": sum(ah) / len(ah),
        "harmless_refusal_score": sum(bb) / len(bb),
        "change": change["estimate"], "change_ci": list(change["ci"]),
        "gap_removed": gap["estimate"], "gap_removed_ci": gap["ci"],
        "refused": sum(v > 0 for v in bh), "refused_ablated": sum(v > 0 for v in ah),
        "newly_answered": newly_answered, "newly_refused": newly_refused,
        "mcnemar_p": mcnemar_exact(newly_answered, newly_refused),
        "harmful_scores": [round(v, 4) for v in bh], "ablated_scores": [round(v, 4) for v in ah],
    }


def config_from_record(config: dict) -> ProbeConfig:
    """The ProbeConfig a probe.jsonl record was written with."""
    fields = ProbeConfig.__dataclass_fields__
    return ProbeConfig(**{k: v for k, v in config.items() if k in fields})


@dataclass
class ProbeResult:
    out: Path
    summary: dict
    candidates: list[dict] = field(default_factory=list)
    resumed: bool = False


def format_prompts(lm: LoadedModel, prompts: list[Prompt], system: str | None) -> list[str]:
    return [lm.adapter.format(lm.tokenizer, p.instruction, system) for p in prompts]


def _finite(x: float) -> float | None:
    """JSON has no NaN: a score that is not a number (a zero direction) is recorded as null."""
    return None if math.isnan(x) or math.isinf(x) else x


def _filter(scores: torch.Tensor, harmful: bool, enabled: bool) -> list[int]:
    if not enabled:
        return list(range(len(scores)))
    keep = scores > 0 if harmful else scores < 0
    return [i for i, k in enumerate(keep.tolist()) if k]


def run_probe(lm: LoadedModel, cfg: ProbeConfig, out: Path, force: bool = False, reporter: Reporter | None = None,
              prompts: PromptSets | None = None) -> ProbeResult:
    """See _run_probe; one run at a time per output folder (a second one fails at once)."""
    from aird.core.reliability import out_lock

    with out_lock(Path(out)):
        return _run_probe(lm=lm, cfg=cfg, out=out, force=force, reporter=reporter, prompts=prompts)


def _run_probe(lm: LoadedModel, cfg: ProbeConfig, out: Path, force: bool = False, reporter: Reporter | None = None,
               prompts: PromptSets | None = None) -> ProbeResult:
    cfg.validate()
    rep = reporter or Reporter()
    probe_plugin = plugins.get("probe", cfg.method)
    out = Path(out)
    jsonl = out / PROBE_JSONL
    sets = prompts or load_prompt_sets(cfg)
    config = {"model_path": lm.path, "model_fingerprint": lm.info.get("fingerprint"), **asdict(cfg),
              "data_fingerprint": texts_fingerprint(p.instruction for s in astuple_sets(sets) for p in s)}
    if force and out.exists():
        for name in (PROBE_JSONL, DIRECTIONS, PLOT):
            (out / name).unlink(missing_ok=True)
    records = read_jsonl(jsonl) if jsonl.exists() else []
    check_resumable(records, config, jsonl, ignore=NON_SEMANTIC)
    done = next((r for r in records if r["record"] == "probe.summary"), None)
    if done is not None:
        if "mediation" not in done and (out / DIRECTIONS).is_file():
            # a probe finished before aird recorded mediation: add it (the chosen direction is on disk)
            t = time.perf_counter()
            dirs = load_tensors(out / DIRECTIONS)["directions"]
            vec = dirs[done["source"]["layer"], done["positions"].index(done["source"]["position"])]
            done["mediation"] = mediation(lm, cfg, sets, vec, lm.adapter.refusal_token_ids(lm.tokenizer),
                                          reporter or Reporter())
            done["timings"] = {**done.get("timings", {}), "mediation": round(time.perf_counter() - t, 3)}
            write_jsonl(jsonl, [done if r["record"] == "probe.summary" else r for r in records])
        return ProbeResult(out, done, [r for r in records if r["record"] == "probe.candidate"], resumed=True)
    out.mkdir(parents=True, exist_ok=True)

    run = Run("probe", lm.spec, config, cfg.seed)
    timings = run.timings
    sw = Stopwatch(timings)
    t0 = time.perf_counter()
    by_type: dict[str, list[dict]] = {}
    for r in records:
        by_type.setdefault(r["record"], []).append(r)

    def flush() -> None:
        ordered = by_type.get("probe.directions", []) + by_type.get("probe.baseline", []) + \
            by_type.get("probe.ranking", []) + by_type.get("probe.candidate", []) + by_type.get("probe.summary", [])
        write_jsonl(jsonl, ordered)

    positions = lm.adapter.post_instruction_positions(lm.tokenizer, cfg.system_prompt)
    refusal_ids = lm.adapter.refusal_token_ids(lm.tokenizer)
    n_layers = lm.n_layers
    cutoff = int(cfg.layer_cutoff * n_layers)

    # ---- 1. activations and candidate directions -------------------------------------------------------
    dir_rec = (by_type.get("probe.directions") or [None])[0]
    if dir_rec is not None and (out / DIRECTIONS).is_file():
        directions = load_tensors(out / DIRECTIONS)["directions"]
        rep.note("reusing candidate directions from a previous run")
    else:
        with sw("activations"):
            texts = format_prompts(lm, sets.harmful_train, cfg.system_prompt) + format_prompts(lm, sets.harmless_train, cfg.system_prompt)
            batches = make_batches(lm, texts, cfg.batch_size)
            acts = None
            store: dict[int, torch.Tensor] = {}
            logits_all = None
            with rep.stage("activations (train prompts)", len(texts)) as advance, torch.inference_mode():
                for b in batches:
                    with hooks.capture_resid(lm, store, positions):
                        logits = run_model(lm, b)[:, -1, :].cpu()
                    stacked = torch.stack([store[i] for i in range(n_layers)], dim=1).float().cpu()  # [B, L, P, d]
                    if acts is None:
                        acts = torch.empty((len(texts), *stacked.shape[1:]), dtype=torch.float32)
                        logits_all = torch.empty((len(texts), logits.shape[-1]), dtype=torch.float32)
                    acts[b.idx] = stacked
                    logits_all[b.idx] = logits
                    advance(len(b.idx))
            n_h = len(sets.harmful_train)
            scores = refusal_scores(logits_all, refusal_ids)
            keep_h = _filter(scores[:n_h], True, cfg.filter_prompts)
            keep_b = _filter(scores[n_h:], False, cfg.filter_prompts)
            if len(keep_h) < 2 or len(keep_b) < 2:
                raise AirdError(
                    f"after filtering only {len(keep_h)} harmful training prompts are refused and {len(keep_b)} "
                    "harmless ones answered; a direction needs at least 2 of each (try --no-filter or more --n-train)."
                )
            harmful_acts = acts[:n_h][keep_h]
            harmless_acts = acts[n_h:][keep_b]
            directions = probe_plugin.directions(harmful_acts, harmless_acts).float()
            if directions.shape != (n_layers, len(positions), acts.shape[-1]):
                raise AirdError(f"probe plugin {cfg.method!r} returned directions of shape {tuple(directions.shape)}.")
            save_tensors(out / DIRECTIONS, {
                "directions": directions,
                "harmful_mean": harmful_acts.mean(0),
                "harmless_mean": harmless_acts.mean(0),
            }, metadata={"positions": ",".join(map(str, positions)), "model": lm.spec})
            del acts
        dir_rec = run.record(
            "probe.directions", n_layers=n_layers, positions=positions, d_model=int(directions.shape[-1]),
            refusal_token_ids=refusal_ids,
            refusal_tokens=[lm.tokenizer.decode([i]) for i in refusal_ids],
            train={"harmful": {"sampled": len(sets.harmful_train), "kept": len(keep_h),
                               "mean_refusal_score": scores[:n_h].mean().item()},
                   "harmless": {"sampled": len(sets.harmless_train), "kept": len(keep_b),
                                "mean_refusal_score": scores[n_h:].mean().item()}},
            timings={"activations": timings["activations"]},
        )
        by_type["probe.directions"] = [dir_rec]
        flush()

    # ---- 2. validation baseline -------------------------------------------------------------------------
    with sw("baseline"):
        val, baseline, hv_k, bv_k = prepare_validation(lm, cfg, sets, refusal_ids, rep)
    if not by_type.get("probe.baseline"):
        by_type["probe.baseline"] = [run.record("probe.baseline", **baseline, timings={"baseline": timings["baseline"]})]
        flush()

    # ---- 3. candidates and ranking -------------------------------------------------------------------------
    candidates = [(layer, pos) for layer in range(min(cutoff, n_layers)) for pos in positions]
    if not candidates:
        raise AirdError(f"no candidate layers below the cutoff {cfg.layer_cutoff} × {n_layers} layers.")
    pidx = {p: i for i, p in enumerate(positions)}
    proxy: dict[tuple[int, int], float] = {}
    if cfg.exhaustive:
        order = candidates
    else:
        rank_rec = (by_type.get("probe.ranking") or [None])[0]
        if rank_rec is not None:
            proxy = {(c["layer"], c["position"]): c["proxy_bypass"] for c in rank_rec["proxy"]}
        else:
            with sw("ranking"):
                units = torch.stack([directions[lay, pidx[pos]] for lay, pos in candidates])
                units = units / units.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                with rep.stage("ranking candidates (attribution proxy)", len(hv_k)) as advance:
                    delta = attribution_bypass(lm, make_batches(lm, hv_k, max(1, cfg.batch_size // 2)), units,
                                               refusal_ids, progress=advance)
            proxy = {c: baseline["harmful_refusal_score"] + d for c, d in zip(candidates, delta.tolist())}
            by_type["probe.ranking"] = [run.record(
                "probe.ranking", method="attribution",
                proxy=[{"layer": c[0], "position": c[1], "proxy_bypass": v} for c, v in proxy.items()],
                timings={"ranking": timings["ranking"]})]
            flush()
        order = sorted(candidates, key=lambda c: proxy[c])

    # ---- 4. full scoring ---------------------------------------------------------------------------------
    scored = {(r["layer"], r["position"]): r for r in by_type.get("probe.candidate", [])}

    def passes(r: dict) -> bool:
        return not r["reasons"]

    def reasons(layer: int, s: Scores) -> list[str]:
        out_ = []
        if any(math.isnan(v) for v in (s.bypass, s.induce, s.kl)):
            out_.append("nan")
        if layer >= cutoff:
            out_.append("layer")
        if not s.kl < cfg.kl_threshold:
            out_.append("kl")
        if not s.induce > cfg.induce_threshold:
            out_.append("induce")
        return out_

    # Exhaustive: score every candidate. Otherwise best-first: score in order of the proxy bypass until
    # top_k candidates have passed the filters (the winner is the lowest true bypass among everything scored),
    # or max_scored candidates have been scored.
    budget = len(order) if cfg.exhaustive else min(len(order), cfg.max_scored)
    per_candidate = val.n_harmful + 2 * len(bv_k)
    with sw("scoring"):
        with rep.stage("scoring candidates", budget * per_candidate) as advance:
            for c in order[:budget]:
                if not cfg.exhaustive and sum(passes(r) for r in scored.values()) >= cfg.top_k:
                    break
                if c in scored:
                    advance(per_candidate)
                    continue
                layer, pos = c
                t = time.perf_counter()
                vec = directions[layer, pidx[pos]]
                if vec.norm() <= 1e-6 * directions.norm(dim=-1).max():
                    # the same tokens on both sides (e.g. template tokens at layer 0): no direction to score
                    s = Scores(math.nan, math.nan, math.nan)
                    advance(per_candidate)
                else:
                    s = score_candidate(lm, val, vec, layer, progress=advance)
                rec = run.record(
                    "probe.candidate", layer=layer, position=pos,
                    bypass=_finite(s.bypass), induce=_finite(s.induce), kl=_finite(s.kl),
                    proxy_bypass=proxy.get(c), reasons=reasons(layer, s), bypass_scores=s.bypass_scores,
                    timings={"seconds": round(time.perf_counter() - t, 3)},
                )
                scored[c] = rec
                by_type.setdefault("probe.candidate", []).append(rec)
                flush()

    # ---- 5. selection --------------------------------------------------------------------------------
    pool = list(scored.values())
    passing = [r for r in pool if passes(r)]
    relaxed = not passing
    if relaxed:
        rep.note("no candidate passed the filters (KL, induce); choosing the lowest bypass score under the layer cutoff")
        passing = [r for r in pool if r["layer"] < cutoff and r["bypass"] is not None]
        if not passing:
            raise AirdError("every candidate direction scored NaN; the activations may be degenerate.")
    best = min(passing, key=lambda r: r["bypass"])
    with sw("mediation"):
        med = mediation(lm, cfg, sets, directions[best["layer"], pidx[best["position"]]], refusal_ids, rep)
    timings["total"] = round(time.perf_counter() - t0, 3)
    summary = run.record(
        "probe.summary",
        n_layers=n_layers,
        positions=positions,
        source={"layer": best["layer"], "position": best["position"]},
        quality={"bypass": best["bypass"], "induce": best["induce"], "kl": best["kl"],
                 # 95% bootstrap interval of the mean bypass score over the harmful validation prompts
                 "bypass_ci": (mean_ci(best["bypass_scores"])["ci"] if best.get("bypass_scores") else None),
                 "n_val_harmful": len(best.get("bypass_scores") or []) or None},
        baseline={k: baseline[k] for k in ("harmful_refusal_score", "harmless_refusal_score",
                                           "harmful_refused_share", "harmless_refused_share")},
        filters_relaxed=relaxed,
        mediation=med,
        n_candidates=len(candidates),
        n_scored=len(scored),
        selection="exhaustive" if cfg.exhaustive else f"best-first by attribution proxy, {cfg.top_k} passing",
        train=dir_rec["train"],
        val_kept=baseline["val_kept"],
        direction_norm=directions[best["layer"], pidx[best["position"]]].norm().item(),
        artifacts={"directions": DIRECTIONS, "plot": PLOT},
        out=str(out),
        timings=dict(timings),
    )
    by_type["probe.summary"] = [summary]
    flush()
    try:
        from aird.core.plots import plot_probe

        plot_probe(out / PLOT, n_layers, positions, list(scored.values()), proxy, summary)
    except Exception as exc:  # a plot must never cost the run its results
        rep.note(f"could not draw {PLOT}: {exc}")
    return ProbeResult(out, summary, list(scored.values()))


def load_probe(path: Path) -> tuple[dict, torch.Tensor, list[dict]]:
    """Read a finished probe folder: its summary, the chosen direction and all candidate records."""
    path = Path(path)
    if path.is_file() and path.name == PROBE_JSONL:
        path = path.parent
    records = read_jsonl(path / PROBE_JSONL)
    summary = next((r for r in records if r["record"] == "probe.summary"), None)
    if summary is None:
        raise ArtifactError(f"{path / PROBE_JSONL} has no summary: the probe did not finish (rerun it to resume).")
    dirs = load_tensors(path / DIRECTIONS)["directions"]
    pos = summary["positions"].index(summary["source"]["position"])
    return summary, dirs[summary["source"]["layer"], pos], [r for r in records if r["record"] == "probe.candidate"]

