"""Benchmark suite on one model (default: the default model): how close aird's probe comes to this machine's
fp32 matmul peak, and the wall time and peak RAM of every subcommand.

    python bench/bench_suite.py [--model default] [--probe-args "..."] [--record docs/benchmarks.md]

1. fp32 matmul peak: the best of a few 2048×2048 (and 4096) torch.mm calls, in GFLOP/s, with the threads torch
   uses for aird.
2. probe, in this process, with a forward pre-hook on every decoder layer and on the LM head counting the token
   positions each one processes: FLOPs = 2 · (decoder parameters per layer · layer-tokens + head parameters ·
   head-tokens), i.e. 2 · parameters · tokens counted where the tokens actually go (the probe runs many
   partial forwards and keeps few logits, so 2 · all parameters · input tokens would overstate it). Attention
   score FLOPs are left out (prompts are short).
3. each subcommand as a child process under the same model (probe with the given small settings, compress rtn
   int8, diff, repair with the score judge, eval with --limit): wall time and peak resident memory.

Rows are printed as Markdown and, with --record, appended with the machine, the command and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_probe import machine, record_row  # noqa: E402


def matmul_peak(threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        for _ in range(3):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def probe_flops(model: str, probe_args: dict, out: Path) -> dict:
    import torch

    from aird.core.loading import load_model
    from aird.core.probe import ProbeConfig, run_probe

    lm = load_model(model)
    counts = {"layer": 0, "head": 0}
    blocks = lm.adapter.layers(lm.model)
    for b in blocks:
        b.register_forward_pre_hook(lambda m, a: counts.__setitem__("layer", counts["layer"] + _tokens(a)))
    head = lm.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda m, a: counts.__setitem__("head", counts["head"] + _tokens(a)))
    per_layer = sum(p.numel() for p in blocks[0].parameters())
    head_params = head.weight.numel()
    cfg = ProbeConfig(**probe_args)
    cfg.dtype = lm.info["dtype"]
    t = time.perf_counter()
    s = run_probe(lm, cfg, out, force=True).summary
    sec = time.perf_counter() - t
    flops = 2 * (per_layer * counts["layer"] + head_params * counts["head"])
    return {"seconds": sec, "flops": flops, "gflops_per_s": flops / sec / 1e9, "layer_tokens": counts["layer"],
            "head_tokens": counts["head"], "chosen": s["source"], "threads": torch.get_num_threads()}


def _tokens(args) -> int:
    x = args[0] if args else None
    return int(x.shape[0] * x.shape[1]) if x is not None and x.dim() == 3 else 0


def child(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds and peak RSS (MB) of a child process (GNU time's %M: the child's own maximum)."""
    with tempfile.NamedTemporaryFile(suffix=".rss") as f:
        t = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", f.name, *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t
        rss = float(Path(f.name).read_text().split()[-1]) / 1024
    if r.returncode != 0:
        print(r.stderr[-2000:], file=sys.stderr)
    return wall, rss, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--probe-args", default="--n-train 64 --n-val 24 --top-k 1 --max-scored 5")
    ap.add_argument("--eval-limit", type=int, default=16)
    ap.add_argument("--record", type=Path)
    ap.add_argument("--no-subcommands", action="store_true", help="only the matmul peak and the probe's share")
    args = ap.parse_args()
    from aird.core.env import set_threads

    threads = set_threads()
    date = dt.date.today()
    mach = machine()
    peak = matmul_peak(threads)
    pa = shlex.split(args.probe_args)
    probe_kw = {pa[i].lstrip("-").replace("-", "_"): int(pa[i + 1]) for i in range(0, len(pa), 2)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        p = probe_flops(args.model, probe_kw, tmp / "probe-inproc")
        record_row(f"| {date} | `python bench/bench_suite.py --model {args.model} --probe-args \"{args.probe_args}\"` | "
                   f"{peak:.1f} | {p['seconds']:.0f} | {p['flops'] / 1e12:.2f} | {p['gflops_per_s']:.1f} | "
                   f"{p['gflops_per_s'] / peak:.1%} | {mach} |", args.record)
        aird = [sys.executable, "-m", "aird"]
        steps = [
            ("probe", aird + ["probe", "--model", args.model, *pa, "--out", str(tmp / "p0")]),
            ("compress rtn int8", aird + ["compress", "--model", args.model, "--method", "rtn", "--bits", "8",
                                          "--out", str(tmp / "c")]),
            ("probe (compressed)", aird + ["probe", "--model", str(tmp / "c"), *pa, "--out", str(tmp / "p1")]),
            ("diff", aird + ["diff", str(tmp / "p0"), str(tmp / "p1"), "--out", str(tmp / "d")]),
            ("repair (score judge)", aird + ["repair", str(tmp / "c"), "--reference", str(tmp / "p0"), "--judge",
                                             "score", "--out", str(tmp / "r")]),
            ("eval safety", aird + ["eval", "--model", args.model, "--limit", str(args.eval_limit),
                                    "--max-new-tokens", "32", "--out", str(tmp / "e")]),
        ]
        for name, cmd in ([] if args.no_subcommands else steps):
            wall, rss, rc = child(cmd)
            record_row(f"| {date} | {name} | `{' '.join(shlex.quote(c) for c in cmd[2:]).replace(str(tmp), 'TMP')}` | "
                       f"{wall:.0f} | {rss:.0f} | {'ok' if rc == 0 else f'exit {rc}'} | {mach} |", args.record)


if __name__ == "__main__":
    main()
