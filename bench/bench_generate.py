"""Benchmark: greedy generation by engine, side by side on the same prompts, and how far the engines agree.

    python bench/bench_generate.py [--model default] [--n 0] [--max-new-tokens 32] [--engines hf vllm vllm:bfloat16]
                                   [--keep DIR] [--timeout S] [--record FILE] [--python vllm=VENV/bin/python]
    python bench/bench_generate.py --one-at-a-time [--n 32] [--max-new-tokens 64]   # batching vs one prompt at a time

Each engine runs in its own process (so its start-up and peak RAM are its own): the default model, AdvBench's
prompts (``--n 0``: all 520) with the model's chat template, greedy. Reported per engine: start-up s (loading,
for vLLM also compiling and warm-up), generation s, generated tokens/s, the useful FLOP rate ((prompt + generated
tokens) × 2 · parameters ÷ generation s) against the fp32 matmul peak measured in the same run, peak RSS; and
against the first engine: the substring judge's verdict agreement, the share of answers whose first 16 tokens
are identical, and the largest refusal-score difference (each engine's score as ``aird eval`` records it).

``--keep DIR`` keeps each engine's results (``DIR/<engine>.json``) and reuses them on the next run, so a long
comparison resumes and a worker that is stopped loses only its own row; ``--timeout S`` stops a worker after S
seconds and reports it as not finished. Each worker prints its stages (start-up, generation, score) as it ends
them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_probe import machine, record_row
from bench_suite import matmul_peak

from aird.core.data import load_set, sample
from aird.core.env import set_threads


def _prompts(n: int):
    rows = load_set("advbench")
    return rows if n in (0, None) or n >= len(rows) else sample(rows, n, 0)


class _Replay:
    """A session that hands back answers already generated (to score them as eval does, timed apart)."""

    def __init__(self, gens):
        self.gens = gens

    def generate(self, texts, n, progress=None):
        return self.gens


def _say(engine: str, line: str) -> None:
    print(f"[{engine}] {line}", file=sys.stderr, flush=True)


def worker(args) -> None:
    """One engine in this process: answer, judge, score; write the results as JSON to ``args.out``."""
    from aird.core import engines, plugins
    from aird.core.loading import load_model

    name, _, dtype = args.worker.partition(":")
    set_threads()
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=(dtype or None) if name == "hf" else None)
    prompts = [p.instruction for p in _prompts(args.n)]
    texts = [lm.adapter.format(lm.tokenizer, p) for p in prompts]
    options = {"batch_size": args.batch_size, **({"dtype": dtype} if dtype else {})}
    tok = lm.tokenizer
    with engines.session(name, lm, options) as sess:
        if name == "hf":
            sess.generate(texts[:2], 4)          # warm-up, as vLLM's start-up includes its own
        startup = time.perf_counter() - t0
        _say(args.worker, f"start-up {startup:.1f} s")
        t = time.perf_counter()
        gens = sess.generate(texts, args.max_new_tokens)
        gen_s = time.perf_counter() - t
        _say(args.worker, f"generation {gen_s:.1f} s, {sum(g.n_new_tokens for g in gens)} new tokens")
    t = time.perf_counter()
    if args.hf_prefill:                                     # every score by one prefill of the hf model
        scores = engines.prompt_refusal_scores(lm, texts, args.batch_size)
    else:                                                   # as eval does (first-step logits, top log-probs, prefill)
        scores = engines.answer(_Replay(gens), lm, texts, 0, args.batch_size)[1]
    score_s = time.perf_counter() - t
    _say(args.worker, f"refusal scores {score_s:.1f} s")
    refused = plugins.get("scorer", "substring").refused(prompts, [g.text for g in gens])
    prompt_tokens = sum(len(tok(x, add_special_tokens=False).input_ids) for x in texts)
    Path(args.out).write_text(json.dumps({
        "engine": args.worker, "startup_s": startup, "generate_s": gen_s, "prefill_score_s": score_s,
        "new_tokens": sum(g.n_new_tokens for g in gens), "prompt_tokens": prompt_tokens,
        "n_params": lm.info["n_params"], "texts": [g.text for g in gens],
        "ids16": [tok(g.text, add_special_tokens=False).input_ids[:16] for g in gens],
        "refused": refused, "scores": scores.tolist(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }))


def one_at_a_time(args) -> None:
    from aird.core.generate import generate
    from aird.core.loading import load_model

    set_threads()
    lm = load_model(args.model)
    texts = [lm.adapter.format(lm.tokenizer, p.instruction) for p in _prompts(args.n)]
    generate(lm, texts[:2], 4, 2)  # warm-up
    res = {}
    for label, bs in (("batched", args.batch_size), ("one at a time", 1)):
        t = time.perf_counter()
        gens = generate(lm, texts, args.max_new_tokens, bs)
        sec = time.perf_counter() - t
        res[label] = (sum(g.n_new_tokens for g in gens) / sec, sec)
    record_row(f"| {dt.date.today()} | `python bench/bench_generate.py --one-at-a-time --model {args.model} --n {args.n} "
               f"--max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size}` | "
               f"{res['batched'][0]:.1f} | {res['one at a time'][0]:.1f} | "
               f"{res['batched'][0] / res['one at a time'][0]:.2f}× | {machine()} |", args.record)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=0, help="AdvBench prompts (0: all 520)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], help="ENGINE or ENGINE:DTYPE, first = baseline")
    ap.add_argument("--one-at-a-time", action="store_true", help="hf batched against one prompt at a time")
    ap.add_argument("--record", type=Path)
    ap.add_argument("--hf-prefill", action="store_true", help="score refusals by an hf prefill, not the engine's own way")
    ap.add_argument("--keep", type=Path, help="keep (and reuse) each engine's results in this folder")
    ap.add_argument("--timeout", type=float, default=None, help="seconds a worker may run")
    ap.add_argument("--python", action="append", default=[], metavar="ENGINE=PYTHON",
                    help="run that engine's worker with another interpreter (e.g. vllm=venv/bin/python, so that "
                         "hf runs in the project's environment and vLLM in its own, in one comparison)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.one_at_a_time:
        return one_at_a_time(args)
    pythons = {}
    for item in args.python:
        name, sep, path = item.partition("=")
        if not sep or not path:
            sys.exit(f"--python takes ENGINE=PYTHON, not {item!r}")
        pythons[name] = path
    peak = matmul_peak(set_threads())
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        keep = args.keep or Path(tmp)
        keep.mkdir(parents=True, exist_ok=True)
        for e in args.engines:
            tag = f"{e.replace(':', '-')}-{args.model.replace('/', '_')}-n{args.n}-t{args.max_new_tokens}"
            out = keep / f"{tag}.json"
            if not out.is_file():
                cmd = [pythons.get(e, sys.executable), __file__, "--worker", e, "--out", str(out.with_suffix(".part")), "--model",
                       args.model, "--n", str(args.n), "--max-new-tokens", str(args.max_new_tokens),
                       "--batch-size", str(args.batch_size)] + (["--hf-prefill"] if args.hf_prefill else [])
                t = time.perf_counter()
                try:
                    subprocess.run(cmd, check=True, timeout=args.timeout)
                except subprocess.TimeoutExpired:
                    print(f"[{e}] did not finish in {time.perf_counter() - t:.0f} s: no row", file=sys.stderr)
                    continue
                out.with_suffix(".part").replace(out)
            results.append(json.loads(out.read_text()))
    if not results:
        sys.exit("no engine finished")
    base = results[0]
    cmd = (f"`python bench/bench_generate.py --model {args.model} --n {args.n} --max-new-tokens "
           f"{args.max_new_tokens} --engines {' '.join(args.engines)}"
           f"{''.join(' --python ' + p for p in args.python)}`")
    for r in results:
        n = len(r["texts"])
        flops = (r["prompt_tokens"] + r["new_tokens"]) * 2 * r["n_params"]
        agree = sum(a == b for a, b in zip(r["refused"], base["refused"])) / n
        same16 = sum(a == b for a, b in zip(r["ids16"], base["ids16"])) / n
        dscore = max(abs(a - b) for a, b in zip(r["scores"], base["scores"]))
        record_row(f"| {dt.date.today()} | {cmd} | {r['engine']} | {n} | {r['startup_s']:.0f} | {r['generate_s']:.1f} | "
                   f"{r['new_tokens'] / r['generate_s']:.1f} | {r['new_tokens'] / r['generate_s'] / (base['new_tokens'] / base['generate_s']):.2f}× | "
                   f"{flops / r['generate_s'] / 1e9:.0f} ({flops / r['generate_s'] / 1e9 / peak:.0%} of {peak:.0f}) | "
                   f"{r['peak_rss_gb']:.1f} | {sum(r['refused'])}/{n} | {agree:.1%} | {same16:.1%} | {dscore:.4f} | "
                   f"{r['prefill_score_s']:.1f} | {machine()} |", args.record)


if __name__ == "__main__":
    main()
