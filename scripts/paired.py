"""Paired changes between finished evaluations: per set, the rate before and after on the prompts both answered,
the McNemar p; the zero-shot mean change and the perplexity ratio with their paired bootstrap intervals.

    python scripts/paired.py BEFORE AFTER [AFTER ...]

Each argument is an `aird eval` output folder (holding eval.jsonl) or a study model folder (holding eval/eval.jsonl).
The prompts a later model's evaluation left out as seen (its repair's fit or tuning sets) are left out of the pair.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

from aird.core.artifacts import read_jsonl
from aird.core.evaluate import EVAL_JSONL, paired_changes
from aird.core.report import perplexity_change, zero_shot_change


def _eval_dir(arg: str) -> Path:
    p = Path(arg)
    return p if (p / EVAL_JSONL).is_file() else p / "eval"


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip())
        return 2
    dirs = [_eval_dir(a) for a in argv]
    for d in dirs:
        if not (d / EVAL_JSONL).is_file():
            print(f"no {EVAL_JSONL} in {d}.")
            return 2
    before = read_jsonl(dirs[0] / EVAL_JSONL, torn_tail_ok=True)
    entry = lambda d: SimpleNamespace(folder=d, eval_dir=d)   # what the report's helpers read of a model  # noqa: E731
    for arg, d in zip(argv[1:], dirs[1:]):
        print(f"{argv[0]} -> {arg}")
        for name, s in paired_changes(before, read_jsonl(d / EVAL_JSONL, torn_tail_ok=True)).items():
            print(f"  {name:24s} {s['metric']:12s} n {s['n']:4d}  {s['baseline']:.3f} -> {s['model']:.3f}  "
                  f"({100 * (s['model'] - s['baseline']):+.1f} points, McNemar p {s['mcnemar_p']:.2g})")
        z = zero_shot_change(entry(dirs[0]), entry(d))
        if z.get("estimate") is not None:
            print(f"  zero-shot mean {100 * z['estimate']:+.1f} points [{100 * z['ci'][0]:+.1f}, {100 * z['ci'][1]:+.1f}]"
                  f" on {len(z['tasks'])} tasks")
        p = perplexity_change(entry(dirs[0]), entry(d))
        if p.get("estimate") is not None:
            print(f"  perplexity x{p['estimate']:.3f} [{p['ci'][0]:.3f}, {p['ci'][1]:.3f}] (n {p['n']} windows)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
