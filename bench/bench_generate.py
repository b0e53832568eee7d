"""Benchmark: greedy generation tokens/s, batched (aird's length-sorted, left-padded batches with the KV cache)
against one prompt at a time, on the same prompts.

    python bench/bench_generate.py [--model default] [--n 32] [--max-new-tokens 64] [--batch-size 16] [--record FILE]
"""

from __future__ import annotations

import argparse
import datetime as dt
import time
from pathlib import Path

from bench_probe import machine, record_row

from aird.core.data import load_set, sample
from aird.core.env import set_threads
from aird.core.generate import generate
from aird.core.loading import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    set_threads()
    lm = load_model(args.model)
    prompts = sample(load_set("advbench"), args.n, 0)
    texts = [lm.adapter.format(lm.tokenizer, p.instruction) for p in prompts]
    generate(lm, texts[:2], 4, 2)  # warm-up
    res = {}
    for label, bs in (("batched", args.batch_size), ("one at a time", 1)):
        t = time.perf_counter()
        gens = generate(lm, texts, args.max_new_tokens, bs)
        sec = time.perf_counter() - t
        res[label] = (sum(g.n_new_tokens for g in gens) / sec, sec)
    row = (f"| {dt.date.today()} | `python bench/bench_generate.py --model {args.model} --n {args.n} "
           f"--max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size}` | "
           f"{res['batched'][0]:.1f} | {res['one at a time'][0]:.1f} | {res['batched'][0] / res['one at a time'][0]:.2f}× | "
           f"{machine()} |")
    record_row(row, args.record)


if __name__ == "__main__":
    main()
