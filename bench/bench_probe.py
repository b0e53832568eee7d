"""Benchmark: wall time per stage and peak RAM of `aird probe` on a model (default: the default model).

    python bench/bench_probe.py [--model default] [--exhaustive] [--record docs/benchmarks.md]

Runs the probe in a fresh temporary folder (no resume), reads the stage timings from the summary record and
the peak resident memory of the child process, and prints a Markdown row; with --record it appends the row,
with the machine, the command and the date, to the given file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def record_row(row: str, path: Path | None) -> None:
    """Print a Markdown table row and append it to ``path`` when given."""
    print(row)
    if path:
        with open(path, "a") as fh:
            fh.write(row + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--exhaustive", action="store_true")
    ap.add_argument("--record", type=Path)
    ap.add_argument("extra", nargs="*", help="more options for aird probe")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "aird", "probe", "--model", args.model, "--out", tmp, "--json", *args.extra]
        if args.exhaustive:
            cmd.append("--exhaustive")
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if res.returncode != 0:
            sys.exit(res.stderr[-2000:])
        s = json.loads(res.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    tm = s["timings"]
    row = (f"| {dt.date.today()} | `aird probe --model {args.model}{' --exhaustive' if args.exhaustive else ''}"
           f"{' ' + ' '.join(args.extra) if args.extra else ''}` | {wall:.0f} | {tm.get('activations', 0):.0f} | "
           f"{tm.get('baseline', 0):.0f} | {tm.get('ranking', 0):.0f} | {tm.get('scoring', 0):.0f} | "
           f"{s['n_scored']}/{s['n_candidates']} | L{s['source']['layer']} pos {s['source']['position']} | "
           f"{peak_mb:.0f} | {machine()} |")
    record_row(row, args.record)


if __name__ == "__main__":
    main()
