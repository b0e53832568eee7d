"""Train the `classifier` judge: a logistic regression over the default model's activations, on XSTest's human labels.

    python scripts/train_judge_classifier.py [--cache runs/judge-features.safetensors] [--limit N]

1. The featurizer (aird's default model) reads every labelled answer of XSTest (2,250: five answering models) and
   JailbreakBench's judge comparison (100); features are the mean resid_pre of each candidate layer over the reply's
   first tokens (cached in --cache, so a second run only refits).
2. For each candidate layer and L2 strength, a cross-fit on XSTest: each (answering model, prompt fold) cell is
   judged by a classifier fitted on the other models' answers to the other folds' prompts. The layer and strength
   with the highest cross-fitted Cohen's κ win. JailbreakBench is never used to choose: it is judged by the
   classifier fitted on all of XSTest, a test on another source.
3. Writes aird/data/judges/classifier.safetensors (the classifier on all rows and the cross-fit ones) and prints
   the selection table as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aird.core import activation_judge as aj  # noqa: E402
from aird.core.judges import agreement, load_labelled, stratified_rows  # noqa: E402

FEATURIZER = "qwen2.5-coder-0.5b-instruct"
LAYERS = [6, 9, 12, 15]
L2 = [1.0, 10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0]
MAX_ANSWER_TOKENS = 48


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=str(ROOT / "runs" / "judge-features.safetensors"))
    ap.add_argument("--out", default=str(ROOT / "aird" / "data" / "judges" / "classifier.safetensors"))
    ap.add_argument("--limit", type=int, default=None, help="labelled rows per data set (a quick trial)")
    ap.add_argument("--featurizer", default=FEATURIZER)
    ap.add_argument("--layers", default=",".join(map(str, LAYERS)))
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    layers = [int(x) for x in args.layers.split(",")]

    xs = stratified_rows(load_labelled("xstest"), args.limit, 42)
    jb = stratified_rows(load_labelled("jailbreakbench"), args.limit, 42)
    rows = xs + jb
    cache = Path(args.cache)
    feats: dict[int, torch.Tensor] = {}
    timing = {}
    if cache.is_file():
        from aird.core.artifacts import load_tensors

        t = load_tensors(cache)
        if int(t["n"].item()) == len(rows) and all(f"l{layer}" in t for layer in layers):
            feats = {layer: t[f"l{layer}"] for layer in layers}
            print(f"features from {cache}", file=sys.stderr)
    if not feats:
        from aird.core.artifacts import save_tensors
        from aird.core.loading import load_model

        lm = load_model(args.featurizer, device="cpu")
        t0 = time.perf_counter()
        done = [0]

        def progress(k):
            done[0] += k
            if done[0] % 160 < k:
                print(f"  {done[0]}/{len(rows)} rows, {time.perf_counter() - t0:.0f} s", file=sys.stderr)

        feats = aj.answer_features(lm, [r.prompt for r in rows], [r.completion for r in rows], layers,
                                   MAX_ANSWER_TOKENS, args.batch_size, progress)
        timing = {"feature_seconds": time.perf_counter() - t0, "rows": len(rows)}
        print(json.dumps(timing), file=sys.stderr)
        save_tensors(cache, {**{f"l{layer}": v for layer, v in feats.items()}, "n": torch.tensor(len(rows))})

    nx = len(xs)
    gold = [r.refusal for r in xs]
    groups = [r.group for r in xs]
    prompts = [r.prompt for r in xs]
    table = []
    best = None
    for layer in layers:
        for l2 in L2:
            probs, fitted = aj.cross_fit(feats[layer][:nx], gold, groups, prompts, l2)
            a = agreement([p > 0.5 for p in probs.tolist()], gold)
            row = {"layer": layer, "l2": l2, "xstest_crossfit_kappa": a["kappa"],
                   "xstest_crossfit_accuracy": a["accuracy"]}
            table.append(row)
            print(json.dumps(row))
            if best is None or a["kappa"] > best[0]["xstest_crossfit_kappa"]:
                best = (row, fitted, probs)
    row, fitted, probs = best
    layer, l2 = row["layer"], row["l2"]
    w, b = aj.fit_logistic(feats[layer][:nx], torch.tensor(gold, dtype=torch.float64), l2)
    jb_pred = (torch.sigmoid(feats[layer][nx:] @ w + b) > 0.5).tolist()
    jb_agree = agreement(jb_pred, [r.refusal for r in jb])
    xs_agree = agreement([p > 0.5 for p in probs.tolist()], gold)
    by_group = {g: agreement([p > 0.5 for p, gg in zip(probs.tolist(), groups) if gg == g],
                             [y for y, gg in zip(gold, groups) if gg == g])["kappa"] for g in sorted(set(groups))}
    summary = {"chosen": row, "xstest_crossfit": xs_agree, "xstest_crossfit_by_model": by_group,
               "jailbreakbench_heldout": jb_agree, **timing}
    print(json.dumps(summary, default=float))
    weights = aj.ClassifierWeights(
        args.featurizer, layer, MAX_ANSWER_TOKENS, {"all": (w, b), **fitted},
        {"trained_on": "xstest", "n_train": nx, "l2": l2, "folds": aj.FOLDS,
         "selection": table, "xstest_crossfit_kappa": xs_agree["kappa"],
         "jailbreakbench_kappa": jb_agree["kappa"],
         "note": "XSTest completions (CC-BY-4.0, Röttger et al. 2024), human final labels; refusal = full or "
                 "partial refusal"})
    weights.save(Path(args.out))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
