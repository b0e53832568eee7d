"""The study report: the paper's tables and plots, and the paper's five findings checked against the numbers.

The report is built as a list of blocks (heading, paragraph, table, image) and rendered twice, as Markdown and
as a self-contained HTML page, so the two always say the same thing.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path

from aird.core import stats
from aird.core.artifacts import atomic_write_text, read_jsonl
from aird.core.evaluate import EVAL_JSONL, by_prompt, mcnemar_exact
from aird.core.numbers import fmt as _f
from aird.core.study_results import Entry

Block = tuple  # ("h", level, text) | ("p", text) | ("table", columns, rows) | ("img", path, caption)


def _paired_origins(before: Entry, after: Entry, keep) -> dict | None:
    """The harmful prompts of two evaluated models, paired, restricted to those whose origin passes ``keep``:
    ASR before and after, newly refused, no longer refused, the exact McNemar p and the origins present (None
    when the per-prompt records are not on disk)."""
    a, b = _prompt_records(before), _prompt_records(after)
    if a is None or b is None:
        return None
    keys = [k for k, r in a.items() if r["role"] == "harmful" and keep(r.get("origin")) and k in b]
    if not keys:
        return {"n": 0, "newly": 0, "gone": 0, "p": 1.0, "before": None, "after": None, "origins": []}
    pr = paired_rate(a, b, keys)
    return {"n": pr["n"], "newly": pr["newly"], "gone": pr["gone"], "p": pr["p"], "before": pr["before"],
            "after": pr["after"], "origins": sorted({a[k].get("origin") or "?" for k in keys})}


def _prompt_records(e: Entry) -> dict | None:
    path = e.eval_dir / EVAL_JSONL if e.folder else None
    if path is None or not path.is_file():
        return None
    return by_prompt(read_jsonl(path, torn_tail_ok=True))


def paired_rate(before: dict, after: dict, keys: list) -> dict:
    """Two models' per-prompt records (by key) on the same prompts ``keys`` of one set: the rate of each (ASR for
    a harmful set: share answered; over-refusal for a benign one: share refused), as counts and shares, and the
    paired change: newly refused, no longer refused, the exact McNemar p."""
    harmful = after[keys[0]]["role"] == "harmful"
    n = len(keys)

    def count(r):
        return sum((not r[k]["refused"]) if harmful else r[k]["refused"] for k in keys)

    kb, ka = count(before), count(after)
    newly = sum(after[k]["refused"] and not before[k]["refused"] for k in keys)
    gone = sum(before[k]["refused"] and not after[k]["refused"] for k in keys)
    return {"harmful": harmful, "n": n, "k_before": kb, "k_after": ka, "before": kb / n, "after": ka / n,
            "newly": newly, "gone": gone, "p": mcnemar_exact(newly, gone)}


def heldout_rows(orig: Entry, parent: Entry, rep: Entry) -> list[list]:
    """Per evaluated set, on its prompts whose source the repair never tuned on: the rate (ASR for harmful
    sets, over-refusal for benign ones) of the original, the compressed and the repaired model on the same
    prompts, the repaired model's change against each (points), and the exact McNemar p of each change."""
    recs = [_prompt_records(e) for e in (orig, parent, rep)]
    if any(r is None for r in recs):
        return []
    tuned = set(((rep.repair or {}).get("tuned_on") or {}).get("origins") or [])
    rows = []
    for name in sorted({k[0] for k in recs[2]}):
        keys = [k for k in recs[2] if k[0] == name and k in recs[0] and k in recs[1]
                and recs[2][k].get("origin") is not None and recs[2][k].get("origin") not in tuned]
        if not keys:
            continue
        vs_c, vs_o = paired_rate(recs[1], recs[2], keys), paired_rate(recs[0], recs[2], keys)
        o, c, x = vs_o["before"], vs_c["before"], vs_c["after"]
        rows.append([rep.name, name, "ASR" if vs_c["harmful"] else "over-refusal", len(keys), _f(o), _f(c), _f(x),
                     f"{100 * (x - c):+.1f}", f"{vs_c['p']:.2g}", f"{100 * (x - o):+.1f}", f"{vs_o['p']:.2g}"])
    return rows


def _budget(c: dict) -> str:
    """What a compression was asked for, the footing on which its variants compare: the sparsity or N:M
    pattern of a pruning, the bits (and group size) of a quantization."""
    p = c.get("params") or {}
    if c.get("kind") == "pruning":
        return f"{p['pattern']} sparsity" if p.get("pattern") else f"{p.get('sparsity')} sparsity"
    bits = p.get("bits") or c.get("bits")            # asked for; the measured bits go in the "achieved" column
    return f"int{bits}" + (f", group {p['group_size']}" if p.get("group_size") else "")


def variant_groups(entries: list[Entry]) -> list[dict]:
    """The study's models grouped by plain compression method and budget (issue: beyond repair): the plain
    compressed model, its refusal-preserving variant(s) at the same budget, and every repair of either. A group
    is returned when it holds the plain model and at least one variant."""
    from aird.core.compress import plain_method

    comp = [e for e in entries if e.role == "compressed" and e.compress]
    groups: dict[tuple, dict] = {}
    for e in comp:
        key = (plain_method(e.compress["method"]), _budget(e.compress))
        g = groups.setdefault(key, {"method": key[0], "budget": key[1], "plain": None, "rows": []})
        if e.compress["method"] == key[0] and g["plain"] is None:
            g["plain"] = e
        g["rows"].append(e)
        g["rows"] += [r for r in entries if r.role == "repaired" and r.parent == e.name]
    return [g for g in groups.values() if g["plain"] is not None and len(g["rows"]) > 1]


def _made_seconds(summary: dict | None) -> float | None:
    """The seconds a compress or repair summary says its run took: the sum of its timed stages."""
    t = (summary or {}).get("timings")
    return float(sum(v for v in t.values() if isinstance(v, (int, float)))) if t else None


def variant_rows(group: dict, entries: list[Entry], sets: list[str]) -> list[list]:
    """One row per model of a variant group: how it was made, what it achieved (sparsity, or bits and whether
    every weight is still on the grid), cosine and source of its direction, each set's rate with its paired
    change against the plain compressed model (points, exact McNemar p), zero-shot mean, perplexity, and the
    seconds it took to make, from its own records' timings (compression, plus the repair for a repaired model),
    so that a step reused from another run keeps its time."""
    from aird.core.compress import takes_reference

    by = {e.name: e for e in entries}
    plain = group["plain"]
    base = _prompt_records(plain)
    rows = []
    for e in group["rows"]:
        if e.role == "compressed":
            how = "plain" if e is plain else ("refusal-preserving" if takes_reference(e.compress["method"])
                                              else e.compress["method"])
            made = _made_seconds(e.compress)
            c = e.compress
        else:
            parent = by[e.parent]
            how = ("" if parent is plain else f"{parent.name} ") + f"+ {e.repair['method']}"
            m1, m2 = _made_seconds(parent.compress), _made_seconds(e.repair)
            made = None if m1 is None or m2 is None else m1 + m2
            c = parent.compress
        if c.get("kind") == "pruning":
            achieved = _f(sparsity(e), 4)
        else:
            grid = (e.repair or {}).get("grid")
            achieved = f"{c.get('bits')} bits" + ("" if e.role == "compressed" else
                                                 ", on the grid" if grid and grid.get("on_grid") else ", off the grid")
        cells = []
        mine = _prompt_records(e)
        for name in sets:
            ev_ = e.eval or {}
            rate = ev_.get("asr", {}).get(name, ev_.get("over_refusal", {}).get(name))
            cell = _f(rate)
            if e is not plain and base is not None and mine is not None:
                keys = [k for k in mine if k[0] == name and k in base]
                if keys:
                    pr = paired_rate(base, mine, keys)
                    cell += f" ({100 * (pr['after'] - pr['before']):+.1f}, p {pr['p']:.2g})"
            cells.append(cell)
        rows.append([e.name, how, achieved, _f(e.diff["cosine_chosen"]) if e.diff else "–", _source(e.probe),
                     *cells, _f((e.eval or {}).get("zero_shot_mean")), _f((e.eval or {}).get("perplexity"), 2),
                     "–" if made is None else f"{made:.0f}"])
    return rows


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def mean_asr(e: "Entry") -> float | None:
    return _mean(list(e.eval["asr"].values())) if e.eval and e.eval.get("asr") else None


def sparsity(e: "Entry") -> float | None:
    if e.compress:
        return e.compress["sparsity"]
    if e.repair:
        return e.repair["sparsity"]["after"]
    return None


def _source(p: dict | None) -> str:
    if not p:
        return "–"
    s = p["source"]
    return f"L{s['layer']} pos {s['position']}" + (" (relaxed)" if p.get("filters_relaxed") else "")


def _task_records(e: Entry) -> dict[str, dict]:
    """The evaluated model's eval.task records by task (zero-shot tasks with their per-question ``items``,
    wikitext2 with its per-window losses); empty when the records are not on disk."""
    path = e.eval_dir / EVAL_JSONL if e.folder else None
    if path is None or not path.is_file():
        return {}
    return {r["task"]: r for r in read_jsonl(path, torn_tail_ok=True) if r["record"] == "eval.task"}


def zero_shot_change(before: Entry, after: Entry, tasks: list[str] | None = None) -> dict:
    """The change of the zero-shot mean accuracy from ``before`` to ``after`` on the questions both answered,
    with its 95% paired bootstrap interval (questions resampled within each task); estimate None when the
    per-question records are missing."""
    a, b = _task_records(before), _task_records(after)
    names = [t for t in (tasks or sorted(a)) if t != "wikitext2" and t in a and t in b
             and (a[t].get("items") or {}).get("acc") and len(a[t]["items"]["acc"]) == len((b[t].get("items") or {}).get("acc", ""))]
    r = stats.paired_bootstrap([[int(c) for c in a[t]["items"]["acc"]] for t in names],
                               [[int(c) for c in b[t]["items"]["acc"]] for t in names])
    return {**r, "tasks": names}


def perplexity_change(before: Entry, after: Entry) -> dict:
    """The perplexity ratio after/before on the same WikiText-2 windows, with its 95% paired bootstrap interval."""
    a, b = _task_records(before).get("wikitext2"), _task_records(after).get("wikitext2")
    if not a or not b or not a.get("window_nll") or len(a["window_nll"]) != len(b.get("window_nll") or []):
        return {"estimate": None, "ci": None, "n": 0}
    per_window = a["tokens"] // max(1, a["windows"])
    return stats.perplexity_ratio(a["window_nll"], b["window_nll"], per_window)


def _ci(r: dict, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    if r.get("estimate") is None:
        return "–"
    lo, hi = r["ci"]
    return f"{scale * r['estimate']:+.{digits}f}{unit} [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]"


def _rate(k: int, n: int) -> str:
    ci = stats.wilson(k, n)
    return f"{k / n:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] (n {n})" if n else "–"


def findings(entries: list["Entry"], cfg: dict) -> list[dict]:
    """The paper's five findings, each decided by a stated test at α = 0.05 (aird/core/stats.py), with one of
    three verdicts — holds, does not hold, inconclusive — or "not tested" when the study lacks the models."""
    by = {e.name: e for e in entries}
    orig = by.get("original")
    comp = [e for e in entries if e.role == "compressed"]
    reps = [e for e in entries if e.role == "repaired"]
    out = []

    # (1) refusal stays mediated by one direction: ablating each compressed model's own direction removes most
    # of the gap in refusal score between its harmful and harmless validation prompts — every sampled prompt
    # (the probe's mediation record); the 95% bootstrap interval of the share removed lies above one half.
    # Probes written before aird recorded mediation fall back to the reference filter's prompts: the interval
    # of the mean harmful refusal score under ablation lies below 0.
    # (a model whose harmful prompts score no higher than its harmless ones does not refuse: nothing to mediate)
    probed = [e for e in comp if e.probe and e.probe["quality"].get("bypass") is not None]
    have = [e for e in probed if e.probe["baseline"]["harmful_refusal_score"] > 0]
    ones, texts, tests = [], [], set()
    for e in probed:
        m = e.probe.get("mediation")
        if m is not None:
            ci = m.get("gap_removed_ci")
            if m.get("gap_removed") is None:
                ones.append(stats.NOT_TESTED)
                texts.append(f"{e.name}: its harmful prompts score no higher than its harmless ones (mean refusal "
                             f"score {_f(m['harmful_refusal_score'], 2)} against {_f(m['harmless_refusal_score'], 2)}):"
                             " nothing to mediate")
                continue
            tests.add("gap")
            v = (stats.HOLDS if ci[0] is not None and ci[0] > 0.5 else
                 stats.DOES_NOT_HOLD if ci[1] is not None and ci[1] < 0.5 else stats.INCONCLUSIVE)
            ones.append(v)
            ci_txt = ", ".join("–" if x is None else f"{100 * x:.0f}%" for x in ci)
            texts.append(
                f"{e.name}: on all {m['n_harmful']} harmful and {m['n_harmless']} harmless validation prompts, "
                f"ablating its direction takes the mean harmful refusal score from "
                f"{_f(m['harmful_refusal_score'], 2)} to {_f(m['ablated_refusal_score'], 2)} (harmless: "
                f"{_f(m['harmless_refusal_score'], 2)}), removing {100 * m['gap_removed']:.0f}% of the gap "
                f"[95% CI {ci_txt}]; harmful prompts scoring above 0 {m['refused']} → {m['refused_ablated']} "
                f"(McNemar p {m['mcnemar_p']:.2g}): {v}")
            continue
        if e not in have:
            continue
        tests.add("filtered")
        q = e.probe["quality"]
        ci = q.get("bypass_ci")
        v = (stats.NOT_TESTED if ci is None else stats.HOLDS if ci[1] < 0 else
             stats.DOES_NOT_HOLD if ci[0] > 0 else stats.INCONCLUSIVE)
        ones.append(v)
        texts.append(f"{e.name}: ablating its direction takes the mean harmful refusal score from "
                     f"{_f(e.probe['baseline']['harmful_refusal_score'], 2)} to {_f(q['bypass'], 2)}"
                     + (f" [95% CI {ci[0]:.2f}, {ci[1]:.2f}; n {q.get('n_val_harmful')} filtered prompts]" if ci else
                        " (no per-prompt scores recorded: no interval)")
                     + f", adding it takes harmless ones from {_f(e.probe['baseline']['harmless_refusal_score'], 2)} "
                       f"to {_f(q['induce'], 2)}: {v}")
    test_txt = {
        "gap": "per model, on every sampled validation prompt: the share of the harmful–harmless gap in refusal "
               "score that ablating its direction removes, 95% bootstrap interval: holds above 1/2, does not hold "
               "below 1/2",
        "filtered": "per model, 95% bootstrap interval of the mean harmful refusal score with its direction "
                    "ablated, on the validation prompts the reference filter keeps: holds below 0, does not hold "
                    "above 0",
    }
    out.append({
        "finding": "1. refusal stays mediated by a single direction after compression",
        "test": "; or, for probes without a mediation record, ".join(test_txt[t] for t in ("gap", "filtered")
                                                                     if t in tests) or test_txt["gap"],
        "verdict": stats.NOT_TESTED if not ones else stats.combine(ones),
        "evidence": "the compressed models do not refuse to begin with (mean harmful refusal score " + ", ".join(
            f"{e.name} {_f(e.probe['baseline']['harmful_refusal_score'], 2)}" for e in probed) + ")"
        if probed and not ones else "; ".join(texts) or "no compressed model probed",
    })

    # (2) pruning moves the direction more than quantization: exact permutation test of the mean cosine
    pr = [e for e in comp if e.kind == "pruning" and e.diff]
    qu = [e for e in comp if e.kind == "quantization" and e.diff]
    f2 = {"finding": "2. pruning moves the direction and its source more than quantization",
          "test": "exact permutation test of the mean cosine to the original direction, pruning below "
                  "quantization, one-sided at 0.05"}
    if pr and qu:
        cosp, cosq = [e.diff["cosine_chosen"] for e in pr], [e.diff["cosine_chosen"] for e in qu]
        t = stats.permutation_means(cosp, cosq)
        mp = sum(e.diff["source"]["moved"] for e in pr)
        mq = sum(e.diff["source"]["moved"] for e in qu)
        least = 1 / t["splits"]
        f2.update(verdict=stats.directional(t["p_less"], t["p_greater"]),
                  evidence=f"mean cosine to the original direction: pruning {_mean(cosp):.3f} ({len(pr)} models), "
                           f"quantization {_mean(cosq):.3f} ({len(qu)}); permutation p {t['p_less']:.2g} "
                           f"(the smallest p these {len(pr)} + {len(qu)} models allow: {least:.2g}); source moved: "
                           f"pruning {mp}/{len(pr)}, quantization {mq}/{len(qu)}")
    else:
        f2.update(verdict=stats.NOT_TESTED, evidence="the grid needs at least one pruning and one quantization")
    out.append(f2)

    # (3) a moved direction comes with a higher ASR: Spearman's ρ over the compressed models, permutation p
    pts = [(e, 1 - e.diff["cosine_chosen"], mean_asr(e) - mean_asr(orig)) for e in comp
           if e.diff and mean_asr(e) is not None and orig and mean_asr(orig) is not None]
    sp = stats.spearman([a for _, a, _ in pts], [b for *_, b in pts])
    out.append({
        "finding": "3. the more the direction moved, the higher the ASR",
        "test": "Spearman rank correlation of (1 − cosine) with the ASR rise over the compressed models, exact "
                "permutation p, one-sided at 0.05",
        "verdict": stats.directional(sp["p_greater"], sp["p_less"]),
        "evidence": (f"Spearman ρ {_f(sp['rho'], 2)} over {len(pts)} compressed models"
                     + (f", p {sp['p_greater']:.2g} (the smallest p {len(pts)} models allow: "
                        f"{1 / math.factorial(len(pts)):.2g})" if sp["p_greater"] is not None else
                        " (needs at least 3 models whose ranks vary; 4 can reach p < 0.05)")
                     + " (" + ", ".join(f"{e.name}: 1−cos {a:.3f}, ΔASR {b:+.3f}" for e, a, b in pts) + ")")
        if pts else "no compressed model evaluated",
    })

    # (4) AIRD lowers ASR, judged on the harmful prompts whose source the repair never tuned on (held out), by
    # the exact McNemar test of the paired change against the compressed parent at α = 0.05
    pairs = [(r, by[r.parent]) for r in reps if r.parent in by and r.eval and by[r.parent].eval]
    verdicts, texts = [], []
    for r, p in pairs:
        tuned = set(((r.repair or {}).get("tuned_on") or {}).get("origins") or [])
        held = _paired_origins(p, r, lambda o, tuned=tuned: o is not None and o not in tuned)
        src = _paired_origins(p, r, lambda o, tuned=tuned: o is None or o in tuned)
        if held is None or not held["n"]:
            verdicts.append(stats.NOT_TESTED)
            texts.append(f"{r.name}: no held-out harmful prompt was evaluated")
            continue
        v = stats.directional(held["p"] if held["after"] < held["before"] else 1.0,
                              held["p"] if held["after"] > held["before"] else 1.0)
        verdicts.append(v)
        n = held["n"]
        mde = stats.mcnemar_mde(n, held["newly"] + held["gone"])
        texts.append(f"{r.name}: held-out ASR {_rate(round(held['before'] * n), n)} → "
                     f"{_rate(round(held['after'] * n), n)} from {', '.join(held['origins'])} ({held['newly']} newly "
                     f"refused, {held['gone']} no longer; McNemar p {held['p']:.2g}: {v}; the smallest change this n "
                     f"detects with 80% power: {100 * mde:.0f} points)"
                     + (f"; in-source ASR {src['before']:.3f} → {src['after']:.3f} on {src['n']} (p {src['p']:.2g}, "
                        "not counted)" if src and src["n"] else ""))
    out.append({
        "finding": "4. AIRD lowers the ASR of the compressed model (on held-out sources)",
        "test": "per repair, exact McNemar test of the held-out harmful prompts' paired change against the "
                "compressed parent, two-sided at 0.05",
        "verdict": stats.combine(verdicts),
        "evidence": "; ".join(texts) or "no model was repaired (no direction moved past the threshold)",
    })

    # (5) AIRD keeps zero-shot accuracy within ±1 point (equivalence: the 95% interval of the paired change lies
    # inside ±1 point), keeps the direction's source, and does not move the direction further from the original
    five, texts = [], []
    for r, p in [(r, by[r.parent]) for r in reps if r.parent in by]:
        zs = zero_shot_change(p, r)
        ppl = perplexity_change(p, r)
        eq = stats.equivalence(tuple(zs["ci"]) if zs["ci"] else None, 0.01)
        same_src = bool(r.probe and orig and orig.probe and r.probe["source"] == orig.probe["source"])
        closer = bool(r.diff and p.diff and r.diff["cosine_chosen"] >= p.diff["cosine_chosen"] - 0.01)
        v = (stats.DOES_NOT_HOLD if eq == stats.DOES_NOT_HOLD or (r.probe and not (same_src and closer)) else
             stats.HOLDS if eq == stats.HOLDS and same_src and closer else stats.INCONCLUSIVE)
        five.append(v)
        texts.append(f"{r.name}: zero-shot mean {_f((p.eval or {}).get('zero_shot_mean'))} → "
                     f"{_f((r.eval or {}).get('zero_shot_mean'))}, change "
                     + (f"{_ci(zs, 100)} points on {zs['n']} questions ({eq} within ±1)" if zs["estimate"] is not None
                        else "without an interval (no per-question records)")
                     + (f"; perplexity ×{ppl['estimate']:.3f} [{ppl['ci'][0]:.3f}, {ppl['ci'][1]:.3f}]"
                        if ppl.get("estimate") is not None else "")
                     + f"; source {_source(r.probe)} vs original {_source(orig.probe if orig else None)}; cosine to "
                       f"the original direction {_f(p.diff['cosine_chosen'] if p.diff else None)} → "
                       f"{_f(r.diff['cosine_chosen'] if r.diff else None)}"
                     + ("; quality (bypass/induce/KL) " + "/".join(_f(r.probe["quality"][k], 2)
                                                                  for k in ("bypass", "induce", "kl")) if r.probe else "")
                     + f": {v}")
    out.append({
        "finding": "5. AIRD leaves zero-shot accuracy within 1 point and keeps the direction's source and quality",
        "test": "per repair, equivalence: the 95% paired bootstrap interval of the zero-shot mean change inside ±1 "
                "point, and the same source as the original's with a cosine no lower than the parent's",
        "verdict": stats.combine(five),
        "evidence": "; ".join(texts) or "no model was repaired",
    })
    ev = cfg.get("eval") or {}
    sizes = {"3": f" [ASR on {ev.get('limit') or 'all'} prompts per set]",
             "4": f" [ASR on {ev.get('limit') or 'all'} prompts per set]",
             "5": f" [zero-shot on {ev.get('task_limit') or 'all'} examples per task]"}
    if ev:
        for f in out:
            f["evidence"] += sizes.get(f["finding"][0], "")
    return out


def study_judge(cfg: dict, entries: list["Entry"]) -> str:
    """The judge whose verdicts make the study's rates: the one its configuration names, else the one its
    evaluations recorded (the default scorer when the study names none), else today's default."""
    named = (cfg.get("eval") or {}).get("scorer")
    if named:
        return named
    used = sorted({e.eval["scorer"] for e in entries if e.eval and e.eval.get("scorer")})
    if used:
        return " / ".join(used)
    from aird.core.configs import default_scorer

    return default_scorer()


def _blocks(out: Path, cfg: dict, entries: list["Entry"], steps: list[dict], found: list[dict],
            plots: dict[str, str]) -> list[Block]:
    orig = next((e for e in entries if e.role == "original"), None)
    ev = cfg["eval"]
    harmful = list(ev["harmful"]) + list(ev.get("jailbreaks") or [])
    benign = list(ev["benign"])
    judge = study_judge(cfg, entries)
    others = [j for j in ev.get("judges") or [] if j != judge]
    b: list[Block] = [("h", 1, f"aird study: {cfg['model']} ({cfg['profile']} profile)")]
    b.append(("p", "Compress the model with a grid of methods, find the refusal direction of every model (difference "
                   "in means, selected by bypass, induce and KL), compare each with the original, repair the ones "
                   "whose direction moved (AIRD rank-one edit), and evaluate all of them. Limits of this run: "
                   f"{ev['limit'] or 'all'} prompts per set, {ev['max_new_tokens']} new tokens, "
                   f"{ev['task_limit'] or 'all'} examples per zero-shot task, {ev['ppl_windows'] or 'all'} "
                   f"WikiText-2 windows; probe {cfg['probe']}. Every refusal verdict behind the ASR and "
                   f"over-refusal numbers and the findings is the {judge!r} judge's"
                   + (f"; the judges {', '.join(map(repr, others))} were recorded beside it (their rates are in "
                      "the judges table)." if others else " (its agreement with human labels: `aird judges validate`, "
                      "docs/judges.md).")))
    for s in cfg.get("skipped", []):
        b.append(("p", f"Skipped {s['name']}: {s['why']}."))
    b.append(("h", 2, "Findings of the paper, checked on this model"))
    b.append(("p", "Each finding is decided by the test named beside it at α = 0.05, with three verdicts: holds (the "
                   "test rejects in the claimed direction), does not hold (it rejects the other way, or an "
                   "\"unchanged\" interval lies outside its margin), inconclusive (the data cannot decide at this n)."))
    b.append(("table", ["finding", "verdict", "test", "evidence"],
              [[f["finding"], f["verdict"], f.get("test", ""), f["evidence"]] for f in found]))

    b.append(("h", 2, "Main table"))
    cols = ["model", "kind", "sparsity", "cosine to original", "source", "moved", "bypass", "induce", "KL"] + \
        [f"ASR {h}" for h in harmful] + [f"over-refusal {x}" for x in benign] + ["zero-shot mean", "perplexity"]
    rows = []
    for e in entries:
        q = e.probe["quality"] if e.probe else {}
        ev_ = e.eval or {}
        rows.append([e.name, e.kind or e.role, _f(sparsity(e), 4),
                     _f(e.diff["cosine_chosen"]) if e.diff else ("1" if e.role == "original" else "–"),
                     _source(e.probe), _f(e.diff["source"]["moved"]) if e.diff else "–",
                     _f(q.get("bypass"), 2), _f(q.get("induce"), 2), _f(q.get("kl"), 3)]
                    + [_f(ev_.get("asr", {}).get(h)) for h in harmful]
                    + [_f(ev_.get("over_refusal", {}).get(x)) for x in benign]
                    + [_f(ev_.get("zero_shot_mean")), _f(ev_.get("perplexity"), 2)])
    b.append(("table", cols, rows))
    b.append(("p", "cosine: between the model's chosen refusal direction and the original model's. source: layer and "
                   "post-instruction position of the chosen direction (relaxed: no candidate passed the reference "
                   "filters, the best-bypass one was kept). bypass: mean refusal score of harmful prompts with the "
                   "direction ablated; induce: of harmless prompts with it added; KL: on harmless prompts under "
                   "ablation. ASR: share of harmful prompts answered (judged by " + repr(judge) + "); over-refusal: "
                   "share of benign prompts refused."))
    if others:
        rows = []
        for e in entries:
            bj = (e.eval or {}).get("by_judge") or {}
            for j in others:
                d = bj.get(j) or {}
                rows.append([e.name, j, _f(_mean(list(d.get("asr", {}).values()))),
                             _f(_mean(list(d.get("over_refusal", {}).values()))),
                             _f((d.get("agreement_with_scorer") or {}).get("kappa"))])
        b.append(("h", 2, f"Judges beside {judge!r}"))
        b.append(("table", ["model", "judge", "mean ASR", "mean over-refusal", f"kappa with {judge!r}"], rows))

    reps = [e for e in entries if e.role == "repaired"]
    if reps:
        by = {e.name: e for e in entries}
        b.append(("h", 2, "Repairs"))
        rows = []
        for r in reps:
            p, s = by[r.parent], r.repair
            rows.append([r.name, s["method"], s["layer"], s["matrix"], _f(s["alpha"]),
                         _f((s.get("validation") or {}).get("target_reached")),
                         (f"{_f(s['layer_sparsity']['before'], 4)} → {_f(s['layer_sparsity']['after'], 4)}"
                          if s.get("layer_sparsity") else "every block edited"),
                         f"{_f(s['sparsity']['before'], 4)} → {_f(s['sparsity']['after'], 4)}",
                         f"{_f(mean_asr(p))} → {_f(mean_asr(r))}",
                         f"{_f(_mean(list((p.eval or {}).get('over_refusal', {}).values())))} → "
                         f"{_f(_mean(list((r.eval or {}).get('over_refusal', {}).values())))}",
                         f"{_f((p.eval or {}).get('zero_shot_mean'))} → {_f((r.eval or {}).get('zero_shot_mean'))}",
                         f"{_f(p.diff['cosine_chosen'] if p.diff else None)} → {_f(r.diff['cosine_chosen'] if r.diff else None)}"])
        b.append(("table", ["repaired", "method", "layer", "matrix", "α", "target reached", "layer sparsity",
                            "model sparsity", "mean ASR", "mean over-refusal", "zero-shot mean", "cosine"], rows))
        held = [row for r in reps if orig for row in heldout_rows(orig, by[r.parent], r)]
        if held:
            b.append(("h", 2, "Repairs on held-out sources, per set"))
            b.append(("p", "Each set on its prompts from sources the repair never tuned on (the probe's and the "
                           "repair's tuning sets name their sources; the rest are held out), the same prompts for "
                           "all three models. Δ: the repaired model's rate minus the other's, in points; p: exact "
                           "McNemar test of the paired change."))
            b.append(("table", ["repaired", "set", "rate", "n", "original", "compressed", "repaired",
                                "Δ vs compressed", "p vs compressed", "Δ vs original", "p vs original"], held))
    elif orig:
        b.append(("p", "No model was repaired: no compressed model's direction moved past the threshold "
                       f"(source moved, or cosine below {cfg['repair']['moved_below_cosine']})."))

    groups = variant_groups(entries)
    if groups:
        b.append(("h", 2, "Compression variants at the same budget"))
        b.append(("p", "Per plain compression: the model as compressed, its repairs, and refusal-preserving "
                       "compression at exactly the same sparsity or bits (achieved: measured from the written "
                       "weights, for a quantization the bits its written codes need; a repair of a quantized model is on the grid when every edited weight is still a "
                       "code times its group's scale). Each rate with, in brackets, its change against the plain "
                       "compressed model on the same prompts in points and the exact McNemar p. seconds: to make "
                       "the model, as its records time it (compression, plus the repair; loading not counted)."))
        for g in groups:
            b.append(("h", 3, f"{g['method']}, {g['budget']}"))
            b.append(("table", ["model", "variant", "achieved", "cosine to original", "source",
                                *[f"ASR {h}" for h in harmful], *[f"over-refusal {x}" for x in benign],
                                "zero-shot mean", "perplexity", "seconds"],
                      variant_rows(g, entries, list(harmful) + list(benign))))

    for h in harmful:
        percat = {e.name: e.eval["asr_by_category"].get(h, {}) for e in entries if e.eval}
        cs = sorted({c for v in percat.values() for c in v})
        if len(cs) > 1:
            b.append(("h", 2, f"ASR by category: {h}"))
            b.append(("table", ["category", *percat], [[c, *[_f(v.get(c)) for v in percat.values()]] for c in cs]))

    cards = [(e, json.loads((Path(e.folder) / "card.json").read_text())) for e in entries
             if e.folder and (Path(e.folder) / "card.json").is_file()]
    if any(c.get("vs_parent") or c.get("vs_original") for _, c in cards):
        b.append(("h", 2, "Safety cards"))
        b.append(("p", "Each model's card.json (beside its folders) holds the sha256 of its weights and its parent's, "
                       "how it was made and the rows below: its paired changes against its parent and against the "
                       "original on the same prompts. Rates with Wilson 95% intervals; Δ in points with the exact "
                       "McNemar p; zero-shot mean change (points) and perplexity ratio with 95% paired bootstrap "
                       "intervals; detectable: the smallest change this n detects with 80% power."))
        rows = []
        for e, c in cards:
            for side in ("vs_parent", "vs_original"):
                d = c.get(side)
                if not d:
                    continue
                for name, r in d["rates"].items():
                    rows.append([e.name, d["model"], name, "ASR" if r["metric"] == "asr" else "over-refusal", r["n"],
                                 f"{r['before']:.3f} [{r['before_ci'][0]:.2f}, {r['before_ci'][1]:.2f}]",
                                 f"{r['after']:.3f} [{r['after_ci'][0]:.2f}, {r['after_ci'][1]:.2f}]",
                                 f"{r['change_points']:+.1f}", f"{r['mcnemar_p']:.2g}", f"{r['detectable_points']:.0f}"])
                zs, ppl = d["zero_shot_mean_change"], d["perplexity_ratio"]
                rows.append([e.name, d["model"], "zero-shot mean", "accuracy", zs.get("n") or "–", "", "",
                             _ci(zs, 100), "", ""])
                if ppl.get("estimate") is not None:
                    rows.append([e.name, d["model"], "WikiText-2", "perplexity ×", ppl.get("n"), "", "",
                                 f"×{ppl['estimate']:.3f} [{ppl['ci'][0]:.3f}, {ppl['ci'][1]:.3f}]", "", ""])
        b.append(("table", ["model", "against", "set", "rate", "n", "against's rate", "model's rate", "Δ",
                            "McNemar p", "detectable (points)"], rows))

    tasks = list(ev["tasks"])
    if any(e.eval and e.eval.get("zero_shot") for e in entries):
        b.append(("h", 2, "Zero-shot accuracy (lm-eval, local files)"))
        b.append(("table", ["task", *[e.name for e in entries]],
                  [[t, *[_f((e.eval or {}).get("zero_shot", {}).get(t, {}).get("acc")) for e in entries]] for t in tasks]))

    b.append(("h", 2, "Plots"))
    for key, caption in (("asr", "ASR by set and by category"), ("scores", "refusal-score distributions, harmful "
                                                                           "against benign prompts")):
        if key in plots:
            b.append(("img", plots[key], caption))
    for e in entries:
        if e.diff:
            png = Path(e.diff["out"]) / "diff.png"
            if png.is_file():
                b.append(("img", os.path.relpath(png, out), f"cosine to the original directions by layer and "
                                                           f"position: {e.name}"))

    b.append(("h", 2, "Steps and wall time"))
    b.append(("table", ["step", "seconds", "reused from disk"],
              [[s["step"], _f(s["seconds"], 1), _f(bool(s.get("resumed")))] for s in steps]))
    total = sum(s["seconds"] for s in steps if not s.get("resumed"))
    b.append(("p", f"Total wall time of the steps run (not reused): {total:.0f} s."))
    return b


def _md(blocks: list[Block]) -> str:
    lines = []
    for blk in blocks:
        if blk[0] == "h":
            lines += ["#" * blk[1] + " " + blk[2], ""]
        elif blk[0] == "p":
            lines += [blk[1], ""]
        elif blk[0] == "table":
            cols, rows = blk[1], blk[2]
            esc = lambda x: str(x).replace("|", "\\|").replace("\n", " ")  # noqa: E731
            lines.append("| " + " | ".join(esc(c) for c in cols) + " |")
            lines.append("|" + "---|" * len(cols))
            lines += ["| " + " | ".join(esc(x) for x in r) + " |" for r in rows]
            lines.append("")
        elif blk[0] == "img":
            lines += [f"![{blk[2]}]({blk[1]})", "", f"*{blk[2]}*", ""]
    return "\n".join(lines)


def _html(blocks: list[Block], title: str) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;"
             "vertical-align:top}th{background:#f2f2f2}img{max-width:100%}figcaption{font-style:italic}"
             "</style></head><body>"]
    for blk in blocks:
        if blk[0] == "h":
            parts.append(f"<h{blk[1]}>{e(blk[2])}</h{blk[1]}>")
        elif blk[0] == "p":
            parts.append(f"<p>{e(blk[1])}</p>")
        elif blk[0] == "table":
            parts.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in blk[1]) + "</tr>")
            parts += ["<tr>" + "".join(f"<td>{e(str(x))}</td>" for x in r) + "</tr>" for r in blk[2]]
            parts.append("</table>")
        elif blk[0] == "img":
            parts.append(f"<figure><img src='{e(blk[1])}' alt='{e(blk[2])}'><figcaption>{e(blk[2])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(out: Path, cfg: dict, entries: list["Entry"], steps: list[dict], found: list[dict],
                 pending: list[str] | None = None) -> Path:
    """Plots into OUT/plots, then OUT/report.md and OUT/report.html; returns the Markdown path. ``pending``: the
    models whose steps are not all finished yet (a report written while the study runs: ``aird study
    --report-only``)."""
    from aird.core.plots import plot_asr, plot_refusal_scores

    plots: dict[str, str] = {}
    evals = {e.name: e.eval for e in entries if e.eval}
    if evals and plot_asr(out / "plots" / "asr_by_category.png", evals):
        plots["asr"] = "plots/asr_by_category.png"
    scores: dict[str, dict[str, list[float]]] = {}
    for e in entries:
        jl = e.eval_dir / "eval.jsonl"
        if jl.is_file():
            recs = [r for r in read_jsonl(jl, torn_tail_ok=True) if r["record"] == "eval.prompt"]
            scores[e.name] = {"harmful": [r["refusal_score"] for r in recs if r["role"] == "harmful"],
                              "benign": [r["refusal_score"] for r in recs if r["role"] == "benign"]}
    if scores and plot_refusal_scores(out / "plots" / "refusal_scores.png", scores):
        plots["scores"] = "plots/refusal_scores.png"
    blocks = _blocks(out, cfg, entries, steps, found, plots)
    if pending:
        blocks.insert(1, ("p", f"Partial report: the study has not finished. It covers the {len(entries)} models "
                               f"whose steps are all done; still to come: {', '.join(pending)} (with the repairs of "
                               "those whose direction moves). What the models still to come would show is missing "
                               "from the findings, not counted against them."))
    md = out / "report.md"
    atomic_write_text(md, _md(blocks))
    atomic_write_text(out / "report.html", _html(blocks, f"aird study: {cfg['model']}"))
    atomic_write_text(out / "findings.json", json.dumps(found, indent=1, ensure_ascii=False) + "\n")
    return md
