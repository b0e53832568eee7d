"""Terminal rendering: rich tables and progress on stderr, JSONL records on stdout when piped or --json."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from aird.core.artifacts import dumps
from aird.core.numbers import fmt
from aird.core.progress import Reporter

console = Console(stderr=True)


def wants_json(flag: bool) -> bool:
    return flag or not sys.stdout.isatty()


def emit(records: Iterable[dict]) -> None:
    for r in records:
        sys.stdout.write(dumps(r) + "\n")
    sys.stdout.flush()


def table(title: str, columns: list[str], rows: Iterable[Iterable], **kw) -> Table:
    t = Table(title=title, title_justify="left", **kw)
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*[fmt(x) for x in row])
    return t


class RichReporter(Reporter):
    """Progress bars on stderr. Stages may nest (a study runs probes that run stages): one live display holds
    them all, an inner bar disappears when its stage ends and the outer one (the study's steps) stays."""

    def __init__(self) -> None:
        self._progress: Progress | None = None

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        outer = self._progress is None
        if outer:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
            )
            self._progress.start()
        progress = self._progress
        task = progress.add_task(description, total=total)

        def advance(n: int = 1, description: str | None = None) -> None:
            progress.update(task, advance=n, **({"description": description} if description else {}))

        try:
            yield advance
        finally:
            if outer:
                progress.stop()
                self._progress = None
            else:
                progress.remove_task(task)

    def note(self, message: str) -> None:
        console.print(escape(message), style="yellow", soft_wrap=True)   # "aird[vllm]" is not markup


def read_ref_from_stdin(keys: tuple[str, ...] = ("out", "path", "model_path")) -> str:
    """Read the artifact path of the first JSONL record (or a plain path) from stdin, for pipelines."""
    from aird.core.errors import AirdError

    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise AirdError("stdin holds a line that is not valid JSON.") from None
            for k in keys:
                if rec.get(k):
                    return str(rec[k])
            raise AirdError(f"the record on stdin has none of the fields {', '.join(keys)}.")
        return line
    raise AirdError("'-' reads a path or a record from stdin, but stdin was empty.")


# ---- one renderer per subcommand: tables of its summary record ------------------------------------------
def render_compress(s: dict, resumed: bool) -> None:
    if resumed:
        console.print(f"[yellow]{s['out']} already holds this compressed model; showing it (use --force to redo).",
                      soft_wrap=True)
    quant = s.get("bits") is not None
    cols = ["layer", "sparsity", "rel. error"] + (["max distinct/group"] if quant else [])
    rows = []
    for r in s["per_layer"]:
        row = [r["layer"], r["sparsity"], r["rel_error"]]
        if quant:
            row.append(max(m.get("max_distinct", 0) for m in r["matrices"].values()))
        rows.append(row)
    console.print(table(f"{s['method']} {s['params']}", cols, rows))
    extra = []
    if s.get("bits") is not None:
        extra.append(f"bits {s['bits']} (at most {s['max_distinct_per_group']} distinct values per group)")
    if s.get("nm_compliant") is not None:
        extra.append(f"N:M pattern {'respected' if s['nm_compliant'] else '[red]VIOLATED[/]'}")
    console.print(
        f"[bold]{s['method']}[/]: achieved sparsity {s['sparsity']:.4f} over {s['n_weights']:,} decoder linear weights"
        + "".join("; " + e for e in extra) +
        f"\n  {s['seconds']:.0f}s compressing, peak RSS {s['peak_rss_mb']:.0f} MB; model folder: {s['out']}",
        highlight=False, soft_wrap=True)


def render_diff(s: dict) -> None:
    q = s["quality"]
    rows = [("original", q["original"]), ("compressed", q["compressed"])]
    if q.get("original_in_compressed"):
        rows.append(("original direction in compressed model", q["original_in_compressed"]))
    console.print(table("quality of the chosen directions", ["direction", "bypass", "induce", "kl"],
                        [(n, v["bypass"], v["induce"], v["kl"]) for n, v in rows]))
    console.print(table("cosine(original, compressed) at the original source position, by layer",
                        ["layer", "cosine"], list(enumerate(s["cosine_by_layer"]))))
    src = s["source"]
    console.print(
        f"[bold]chosen directions[/]: cosine {s['cosine_chosen']:.3f}; source original layer "
        f"{src['original']['layer']} pos {src['original']['position']}, compressed layer {src['compressed']['layer']} "
        f"pos {src['compressed']['position']} ({'[red]moved[/]' if src['moved'] else 'unchanged'}); "
        f"heatmap: {s['out']}/diff.png", highlight=False, soft_wrap=True)


def render_repair(s: dict) -> None:
    if "validation" in s:
        _render_search(s)
    elif s.get("rank") is None:   # the sparse compensation: every linear refitted on its kept weights
        console.print(table("relative residual error against the original after each block, on the calibration",
                            ["block", "before", "after", "linears: weighted error kept"],
                            [(b["layer"], b["error_before"], b["error_after"],
                              sum(v["error_after"] for v in b["linears"].values())
                              / (sum(v["error_before"] for v in b["linears"].values()) or 1.0))
                             for b in s["blocks"]]))
        console.print(
            f"[bold]{s['method']}[/]: every linear of every block, {s['iterations']} CG steps, α {s['alpha']:g}, "
            f"ridge {s['ridge']:g}; model sparsity {s['sparsity']['before']:.4f} → {s['sparsity']['after']:.4f}; "
            f"model folder: {s['out']}", highlight=False, soft_wrap=True)
    else:   # a compensating repair: every block fitted, no search
        console.print(table("relative residual error against the original after each block, on the calibration",
                            ["block", "before", "after", "attn: share fitted", "mlp: share fitted"],
                            [(b["layer"], b["error_before"], b["error_after"], b["attn"]["energy"], b["mlp"]["energy"])
                             for b in s["blocks"]]))
        console.print(
            f"[bold]{s['method']}[/]: every block, rank {s['rank']}, α {s['alpha']:g}, ridge {s['ridge']:g}; "
            f"{s['adapter_parameters']:,} parameters as low-rank factors; model sparsity "
            f"{s['sparsity']['before']:.4f} → {s['sparsity']['after']:.4f}; model folder: {s['out']}",
            highlight=False, soft_wrap=True)
    _render_check(s.get("check"))


def _render_search(s: dict) -> None:
    v = s["validation"]
    rows = [("original", v["original"]), ("compressed", v["compressed"]), ("repaired", v["repaired"])]
    judged = "greedy answers judged by the scorer" if v.get("judge") == "generate" else "refusal score > 0"
    console.print(table(f"refusal rates on the validation prompts ({judged})",
                        ["model", "harmful refused", "harmless refused"],
                        [(n, r["harmful_refusal_rate"], r["harmless_refusal_rate"]) for n, r in rows]))
    console.print(
        f"[bold]{s['method']}[/]: layer {s['layer']} ({s['matrix']}), α {s['alpha']:g}"
        f"{'' if v['target_reached'] else ' [red](target not reached)[/]'}; layer sparsity "
        f"{s['layer_sparsity']['before']:.4f} → {s['layer_sparsity']['after']:.4f}, model sparsity "
        f"{s['sparsity']['before']:.4f} → {s['sparsity']['after']:.4f}; model folder: {s['out']}",
        highlight=False, soft_wrap=True)


def _render_check(check: dict | None) -> None:
    if check:
        rows = []
        for name, c in check["sets"].items():
            for split in ("held_out", "in_source"):
                d = c.get(split)
                if d:
                    rows.append((name, split.replace("_", "-"), d["n"], d["original"], d["compressed"], d["repaired"],
                                 d["vs_compressed"]["newly_refused"], d["vs_compressed"]["no_longer_refused"],
                                 d["vs_compressed"]["mcnemar_p"], d["vs_original"]["mcnemar_p"]))
        console.print(table(f"the check on prompts the tuning never saw ({check['scorer']} judge; ASR for harmful "
                            "sets, over-refusal for benign)",
                            ["set", "sources", "n", "original", "compressed", "repaired", "newly refused",
                             "no longer", "p vs compressed", "p vs original"], rows))


def render_eval(models: list[str], summaries: list[dict]) -> None:
    rows = []
    for key, label in (("asr", "ASR"), ("over_refusal", "over-refusal"), ("mean_refusal_score", "mean refusal score")):
        names = sorted({n for s in summaries for n in s[key]})
        rows += [(f"{label}: {n}", *[s[key].get(n) for s in summaries]) for n in names]
    tasks = sorted({t for s in summaries for t in s.get("zero_shot", {})})
    rows += [(f"zero-shot acc: {t}", *[s["zero_shot"].get(t, {}).get("acc") for s in summaries]) for t in tasks]
    if tasks:
        rows.append(("zero-shot acc: mean", *[s.get("zero_shot_mean") for s in summaries]))
    rows.append(("WikiText-2 perplexity", *[s.get("perplexity") for s in summaries]))
    console.print(table("eval", ["metric", *models], rows))
    for model, s in zip(models, summaries):
        for name, cats in s["asr_by_category"].items():
            if len(cats) > 1:
                console.print(table(f"ASR by category, {name}, {model}", ["category", "ASR"], list(cats.items())))
        for name, cats in s.get("over_refusal_by_category", {}).items():
            if len(cats) > 1:
                console.print(table(f"over-refusal by category, {name}, {model}", ["category", "over-refusal"],
                                    list(cats.items())))
    for model, s in zip(models, summaries):
        if s.get("by_judge"):
            rows = [(j, f"{'ASR' if k == 'asr' else 'over-refusal'}: {n}", v, (d.get("agreement_with_scorer") or {}).get("kappa"))
                    for j, d in s["by_judge"].items() for k in ("asr", "over_refusal") for n, v in d[k].items()]
            console.print(table(f"judges, {model} (kappa: agreement with the scorer)", ["judge", "rate", "value",
                                                                                       "kappa"], rows))
    console.print(f"limits: {summaries[0]['limits']}", highlight=False, soft_wrap=True)
    for name, s in zip(models, summaries):
        e = s.get("engine")
        if e:
            console.print(f"{name}: answered by {e['engine']} ({e.get('dtype')}, start-up {e.get('startup_s', 0):.0f} s, "
                          f"{s.get('generated_tokens_per_s') or 0:.1f} generated tokens/s)", highlight=False, soft_wrap=True)


def render_paired(paired: list[dict]) -> None:
    """Each model against the first, prompt by prompt: the changes behind the rates, and whether they are noise."""
    for rec in paired:
        rows = [(name, d["metric"], d["n"], d["baseline"], d["model"], d["newly_refused"], d["no_longer_refused"],
                 f"{d['mcnemar_p']:.2g}") for name, d in rec["sets"].items()]
        console.print(table(f"{rec['compared']} against {rec['baseline']}, the same prompts",
                            ["set", "metric", "n", rec["baseline"], rec["compared"], "newly refused",
                             "no longer refused", "McNemar p"], rows))


def render_study(res) -> None:
    from aird.core.report import mean_asr, sparsity

    rows = []
    for e in res.entries:
        q = e.probe["quality"] if e.probe else {}
        rows.append((e.name, sparsity(e), e.diff["cosine_chosen"] if e.diff else None,
                     f"L{e.probe['source']['layer']} pos {e.probe['source']['position']}" if e.probe else None,
                     q.get("bypass"), mean_asr(e), (e.eval or {}).get("zero_shot_mean"),
                     (e.eval or {}).get("perplexity")))
    console.print(table("study", ["model", "sparsity", "cosine", "source", "bypass", "mean ASR", "zero-shot",
                                  "perplexity"], rows))
    console.print(table("findings of the paper", ["finding", "verdict"],
                        [(f["finding"], f["verdict"]) for f in res.findings]))
    if res.pending:
        console.print(f"[yellow]partial: not finished yet: {', '.join(res.pending)}", highlight=False, soft_wrap=True)
    console.print(f"report: {res.report} (and report.html); {res.seconds:.0f}s", highlight=False, soft_wrap=True)


def render_probe(summary: dict, candidates: list[dict], resumed: bool) -> None:
    if resumed:
        console.print(f"[yellow]{summary['out']} already holds a finished probe; showing it (use --force to redo).", soft_wrap=True)
    src, q, b = summary["source"], summary["quality"], summary["baseline"]
    best = sorted(candidates, key=lambda r: float("inf") if r["bypass"] is None else r["bypass"])[:10]
    console.print(table(
        f"candidates scored ({summary['n_scored']} of {summary['n_candidates']}, {summary['selection']})",
        ["layer", "pos", "bypass", "induce", "kl", "proxy", "filtered by"],
        [(r["layer"], r["position"], r["bypass"], r["induce"], r["kl"], r.get("proxy_bypass"),
          ",".join(r["reasons"]) or "") for r in best]))
    relaxed = " [red](filters relaxed: no candidate passed)[/]" if summary["filters_relaxed"] else ""
    console.print(
        f"[bold]refusal direction of {summary['model']}[/]: source layer {src['layer']} / {summary['n_layers']}, "
        f"position {src['position']}{relaxed}\n"
        f"  quality: bypass {fmt(q['bypass'])} (harmful baseline {fmt(b['harmful_refusal_score'])}), "
        f"induce {fmt(q['induce'])} (harmless baseline {fmt(b['harmless_refusal_score'])}), KL {fmt(q['kl'], 4)}\n"
        f"  kept prompts: train {summary['train']['harmful']['kept']}/{summary['train']['harmful']['sampled']} harmful, "
        f"{summary['train']['harmless']['kept']}/{summary['train']['harmless']['sampled']} harmless; "
        f"val {summary['val_kept']['harmful']}/{summary['val_kept']['harmful_sampled']} harmful, "
        f"{summary['val_kept']['harmless']}/{summary['val_kept']['harmless_sampled']} harmless\n"
        f"  time: " + ", ".join(f"{k} {v:.0f}s" for k, v in summary["timings"].items()) + f"\n  artifacts: {summary['out']}",
        highlight=False,
    )
