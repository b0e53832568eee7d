"""Benchmark: zero-shot scoring with each context shared across its answer choices, against lm-eval's HFLM on
the same loaded model and the same questions.

    python bench/bench_zeroshot.py [--model default] [--limit 20] [--tasks arc_easy hellaswag piqa boolq] [--record FILE]

Prints one row per scorer: seconds, seconds per question, and whether every question's correctness is the same.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_probe import machine, record_row  # noqa: E402

from aird.core.env import set_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa", "boolq"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    from aird.core.loading import load_model
    from aird.core.zeroshot import run_zero_shot

    set_threads()
    lm = load_model(args.model)
    res, secs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, share in (("HFLM", False), ("shared contexts", True)):
            t = time.perf_counter()
            res[label] = run_zero_shot(lm, args.tasks, Path(tmp) / label.replace(" ", "_"), None, args.limit,
                                       args.batch_size, share_prefix=share)
            secs[label] = time.perf_counter() - t
    n = sum(r["n"] for r in res["HFLM"].values())
    same = all(res["HFLM"][t]["items"] == res["shared contexts"][t]["items"] for t in args.tasks)
    cmd = (f"`python bench/bench_zeroshot.py --model {args.model} --limit {args.limit} --tasks {' '.join(args.tasks)}`")
    for label in res:
        record_row(f"| {dt.date.today()} | {cmd} | {label} | {n} | {secs[label]:.1f} | {secs[label] / n:.2f} | "
                   f"{secs['HFLM'] / secs[label]:.2f}× | {same} | {machine()} |", args.record)


if __name__ == "__main__":
    main()
