"""How far each judge (scorer plugin) agrees with people: ``aird judges validate``.

Labelled answers bundled with aird (aird/data/SOURCES.md):
- ``xstest``: 2,250 answers of five models (GPT-4, Llama-2 original and new system prompt, Mistral-Instruct,
  Mistral with a guard prompt) to the 450 XSTest prompts, each with two human annotations and a final label
  (full compliance / full refusal / partial refusal). Refusal = full or partial refusal (XSTest's own reading:
  a partial refusal declines part of the request).
- ``jailbreakbench``: 100 answers to jailbreak prompts, three human labels (jailbroken or not) and their
  majority, and five published judges' verdicts on the same rows. Here "refusal" is the human majority's
  "not jailbroken": an answer that is neither harmful nor on task counts as a refusal, which is what ASR counts.

Metrics treat "refusal" as the positive class: accuracy, precision, recall, F1, Cohen's κ, the confusion
counts, and seconds per 100 judgements (the judge's own time, its model's loading excluded and reported apart).
"""

from __future__ import annotations

import csv
import io
import random
import time
from dataclasses import dataclass, field

from aird.core import plugins
from aird.core.data import find_file, read_text
from aird.core.errors import AirdError
from aird.core.progress import Reporter

XSTEST_MODELS = ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")
DATASETS = ("xstest", "jailbreakbench")
PUBLISHED_JBB = ("TDC", "GCG", "BERT", "llama_guard", "gpt_4_turbo", "gpt_4")


@dataclass
class Labelled:
    prompt: str
    completion: str
    refusal: bool              # the human label
    group: str                 # the answering model (xstest) or the data set
    kind: str = ""             # XSTest prompt type, "safe"/"unsafe" contrast
    published: dict = field(default_factory=dict)   # other judges' verdicts on the row (True: refusal)


def _csv(name: str, data_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO(read_text(find_file(name, data_dir).path))))


def load_labelled(dataset: str, data_dir=None) -> list[Labelled]:
    if dataset == "xstest":
        rows = []
        for m in XSTEST_MODELS:
            for r in _csv(f"xstest_completions_{m}", data_dir):
                label = r["final_label"].strip()
                if not label:
                    continue
                rows.append(Labelled(r["prompt"], r["completion"], not label.startswith("1_"), m,
                                     "unsafe" if r["type"].startswith("contrast") else "safe"))
        return rows
    if dataset == "jailbreakbench":
        return [Labelled(r["prompt"], r["target_response"], r["human_majority"].strip() == "0", "jailbreakbench",
                         published={j: r[j].strip() == "0" for j in PUBLISHED_JBB if r.get(j, "").strip() != ""})
                for r in _csv("jailbreakbench_judges", data_dir)]
    raise AirdError(f"unknown labelled data set {dataset!r}; use {' or '.join(DATASETS)}.")


def stratified_rows(rows: list[Labelled], n: int | None, seed: int) -> list[Labelled]:
    """At most ``n`` rows, spread evenly over (group, human label): a seeded shuffle within each cell, then one
    from each cell in turn. All rows when ``n`` is None or large enough."""
    if n is None or n >= len(rows):
        return rows
    cells: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        cells.setdefault((r.group, r.refusal), []).append(i)
    rng = random.Random(seed)
    for v in cells.values():
        rng.shuffle(v)
    picked: list[int] = []
    while len(picked) < n:
        for key in sorted(cells):
            if cells[key] and len(picked) < n:
                picked.append(cells[key].pop())
    return [rows[i] for i in sorted(picked)]


def agreement(pred: list[bool], gold: list[bool]) -> dict:
    """Accuracy, precision/recall/F1 of "refusal", Cohen's κ and the confusion counts."""
    n = len(gold)
    if n == 0:
        raise AirdError("no labelled rows to compare.")
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = n - tp - fp - fn
    acc = (tp + tn) / n
    prec = tp / (tp + fp) if tp + fp else None
    rec = tp / (tp + fn) if tp + fn else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else 0.0
    pe = ((tp + fp) * (tp + fn) + (fn + tn) * (fp + tn)) / n**2   # chance agreement from the marginals
    kappa = (acc - pe) / (1 - pe) if pe < 1 else None
    return {"n": n, "accuracy": acc, "precision": prec, "recall": rec, "f1": f1, "kappa": kappa,
            "confusion": {"refusal_as_refusal": tp, "compliance_as_refusal": fp, "refusal_as_compliance": fn,
                          "compliance_as_compliance": tn}}


def validate(judges: list[str], datasets: list[str], limit: int | None = None, seed: int = 42, data_dir=None,
             reporter: Reporter | None = None, judge_options: dict | None = None,
             skip_unready: bool = False) -> list[dict]:
    """One ``judges.validation`` record per (judge, data set), published judges' rows included where the data
    set has them. ``skip_unready``: a judge that cannot get ready (its model not installed) gets a record with
    ``skipped`` and the reason instead of stopping the run."""
    rep = reporter or Reporter()
    objs = {name: plugins.get("scorer", name) for name in judges}
    for obj in objs.values():
        if hasattr(obj, "configure"):
            obj.configure(**(judge_options or {}))
    out = []
    for ds in datasets:
        rows = stratified_rows(load_labelled(ds, data_dir), limit, seed)
        gold = [r.refusal for r in rows]
        for name, obj in objs.items():
            if getattr(obj, "uses_scores", False):   # it reads the answering model, which labelled data lacks
                why = "it judges by the answering model's own refusal scores, which stored answers do not have"
                rep.note(f"judge {name} skipped: {why}")
                out.append({"record": "judges.validation", "judge": name, "dataset": ds, "skipped": why})
                continue
            t_load = time.perf_counter()
            try:
                if hasattr(obj, "prepare"):
                    obj.prepare()
            except AirdError as exc:
                if not skip_unready:
                    raise
                rep.note(f"judge {name} skipped: {exc}")
                out.append({"record": "judges.validation", "judge": name, "dataset": ds, "skipped": str(exc)})
                continue
            load_s = time.perf_counter() - t_load
            with rep.stage(f"judge {name} on {ds} ({len(rows)} answers)", 1) as advance:
                t = time.perf_counter()
                heldout = ds in getattr(obj, "trained_on", ())
                if heldout:    # trained on this data set: each row judged by a fit that never saw its cell
                    pred = obj.refused_heldout([r.prompt for r in rows], [r.completion for r in rows],
                                               [r.group for r in rows])
                else:
                    pred = obj.refused([r.prompt for r in rows], [r.completion for r in rows])
                sec = time.perf_counter() - t
                advance(1)
            out.append({"record": "judges.validation", "judge": name, "dataset": ds, **agreement(pred, gold),
                        "seconds_per_100": 100 * sec / len(rows), "load_s": round(load_s, 2),
                        "by_group": {g: agreement([p for p, r in zip(pred, rows) if r.group == g],
                                                  [r.refusal for r in rows if r.group == g])["kappa"]
                                     for g in sorted({r.group for r in rows})},
                        "limit": limit, "seed": seed, **_judge_info(obj),
                        **({"cross_fitted": "each row judged by a classifier fitted without its answering model "
                                            "and its prompt's fold"} if heldout else {})})
        for pub in sorted({k for r in rows for k in r.published}):
            keep = [r for r in rows if pub in r.published]
            out.append({"record": "judges.validation", "judge": f"published:{pub}", "dataset": ds,
                        **agreement([r.published[pub] for r in keep], [r.refusal for r in keep]),
                        "seconds_per_100": None, "limit": limit, "seed": seed})
    return out


def _judge_info(obj) -> dict:
    info = getattr(obj, "info", None)
    return {"judge_info": info() if callable(info) else info} if info else {}
