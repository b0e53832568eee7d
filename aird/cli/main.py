"""`aird`: the Typer application. Each command parses its options, calls one core function and renders."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from aird import __version__
from aird.cli.render import RichReporter, console, emit, fmt, read_ref_from_stdin, table, wants_json
from aird.core.errors import AirdError
from aird.core.reliability import check_writable_folder

app = typer.Typer(
    name="aird",
    help="Did pruning or quantization break a chat model's refusal direction, and can a rank-one edit repair it?",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,   # help texts hold literal [brackets], e.g. "[default: ...]"
)
models_app = typer.Typer(help="The named models aird installs from the package index.", invoke_without_command=True)
app.add_typer(models_app, name="models")
judges_app = typer.Typer(help="Judges (scorer plugins) and how far they agree with human labels.")
app.add_typer(judges_app, name="judges")

JSON_OPT = typer.Option(False, "--json", help="Print JSONL records on stdout (the default when stdout is piped).")
DATA_DIR_OPT = typer.Option(None, envvar="AIRD_DATA_DIR",
                            help="Data directory with your own copies of the sets, read before the copies bundled with "
                                 "aird (see `aird data`) [default: the bundled copies].")
DEVICE_OPT = typer.Option("auto", help="auto (CUDA when present), cpu or cuda.")
DTYPE_OPT = typer.Option("auto", help="auto (float32 on CPU, bfloat16 on CUDA), float32, bfloat16.")
THREADS_OPT = typer.Option(None, help="CPU threads [default: all cores].")
TRUST_OPT = typer.Option(False, "--trust-remote-code", help="Allow code from the model's hub repository.")
ENGINE_OPT = typer.Option("auto", "--engine", envvar="AIRD_ENGINE", help="Generation engine: auto (vLLM when installed and able to run "
                          "the model, else hf, with one line saying why), hf, vllm, or a plugin's.")
TP_OPT = typer.Option(None, "--tensor-parallel-size", help="vLLM: GPUs that share each layer.")
PP_OPT = typer.Option(None, "--pipeline-parallel-size", help="vLLM: GPUs (or nodes) that share the layers.")
EXECUTOR_OPT = typer.Option(None, "--distributed-executor-backend",
                            help="vLLM: mp (one node) or ray (a Ray cluster, across nodes).")


def engine_options(tp: int | None, pp: int | None, executor: str | None) -> dict:
    """The vLLM pass-through options a user set (others keep vLLM's defaults)."""
    opts = {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "distributed_executor_backend": executor}
    return {k: v for k, v in opts.items() if v is not None}


@contextmanager
def user_errors() -> Iterator[None]:
    """The error boundary. Errors a user can cause (aird's own, and a path, a permission, the disk or a file's
    bytes) end in one sentence and exit 2; Ctrl-C in exit 130 and SIGTERM in 143, each after the write in
    progress has finished or been rolled back; anything else is a bug: one sentence naming the crash log that
    holds the traceback, and exit 1."""
    import click

    from aird.core.reliability import Terminated, sigterm_as_exception, user_error_sentence, write_crash_log

    try:
        with sigterm_as_exception():
            yield
    except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
        raise
    except AirdError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] rerun the same command to resume.")
        raise typer.Exit(130) from None
    except Terminated:
        console.print("[bold red]terminated:[/] rerun the same command to resume.")
        raise typer.Exit(143) from None
    except Exception as exc:
        sentence = user_error_sentence(exc)
        if sentence is not None:
            console.print(f"[bold red]error:[/] {sentence}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        log = write_crash_log(exc)
        console.print(f"[bold red]aird hit an internal error[/] ({type(exc).__name__}); the traceback is in {log}; "
                      "please report it.", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _version(value: bool) -> None:
    if value:
        print(f"aird {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")):
    pass


# ---- plugins ----------------------------------------------------------------------------------------------
@app.command("plugins")
def plugins_cmd(json_out: bool = JSON_OPT) -> None:
    """List every registered compressor, probe, scorer and repair plugin, and any plugin that failed to load."""
    from aird.core.plugins import registry

    with user_errors():
        reg = registry()
        rows = [{"record": "plugin", "kind": r.kind, "name": r.name, "origin": r.origin, "version": r.version,
                 "plugin": r.plugin, "builtin": r.builtin, "description": getattr(r.obj, "description", "")}
                for r in reg.items]
        broken = [{"record": "plugin.error", "plugin": b.plugin, "origin": b.origin, "error": b.error} for b in reg.broken]
        console.print(table("plugins", ["kind", "name", "origin", "version", "description"],
                            [(r["kind"], r["name"], "built-in" if r["builtin"] else r["origin"], r["version"],
                              r["description"]) for r in rows]))
        for b in broken:
            console.print(f"[red]plugin {b['plugin']} ({b['origin']}) failed to load: {b['error']}", highlight=False)
        if wants_json(json_out):
            emit(rows + broken)


# ---- models -----------------------------------------------------------------------------------------------
@models_app.callback()
def models_list(ctx: typer.Context, json_out: bool = JSON_OPT) -> None:
    """List the named models: their packages, and whether they are installed, assembled and converted."""
    if ctx.invoked_subcommand is not None:
        return
    from aird.core import registry

    with user_errors():
        rows = [{"record": "model", **registry.status(m)} for m in registry.MODELS.values()]
        console.print(table("named models", ["name", "aliases", "installed", "converted", "size MB", "description"],
                            [(r["name"], ",".join(r["aliases"]), r["installed"], r["converted"],
                              f"{r['size'] / 1e6:.0f}", r["description"]) for r in rows]))
        if wants_json(json_out):
            emit(rows)


@models_app.command("install")
def models_install(name: str = typer.Argument(..., help="A named model (see `aird models`), e.g. default."),
                   json_out: bool = JSON_OPT) -> None:
    """pip-install a named model's pinned packages (--no-deps), assemble and verify its GGUF, convert it."""
    from aird.core import registry
    from aird.core.loading import prepare_named

    with user_errors():
        m = registry.lookup(name)
        if m is None:
            raise AirdError(f"unknown model {name!r}; named models: {', '.join(registry.MODELS)}.")
        with console.status(f"installing {m.name} (download, sha256 check, GGUF dequantization)"):
            folder = prepare_named(m, install=True)
        console.print(f"[green]{m.name}[/] ready at {folder}")
        if wants_json(json_out):
            emit([{"record": "model.installed", "name": m.name, "path": str(folder), "out": str(folder)}])


# ---- judges -----------------------------------------------------------------------------------------------
@judges_app.command("validate")
def judges_validate(
    judges: Optional[list[str]] = typer.Option(None, "--judge", help="Judge(s) to validate [default: every "
                                               "registered scorer]."),
    datasets: list[str] = typer.Option(["xstest", "jailbreakbench"], "--dataset", help="Human-labelled answers: "
                                       "xstest (2,250 answers of five models), jailbreakbench (100, with five "
                                       "published judges' verdicts)."),
    limit: Optional[int] = typer.Option(None, help="At most this many answers per data set, spread over answering "
                                                   "model and human label (seeded)."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", envvar="AIRD_JUDGE_MODEL",
                                              help="The llm judge's model: a named model or a folder "
                                                   "[default: qwen2.5-coder-1.5b-instruct]."),
    seed: int = typer.Option(42),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write judges.jsonl here too."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    threads: Optional[int] = THREADS_OPT,
    json_out: bool = JSON_OPT,
) -> None:
    """Accuracy, precision, recall and F1 of "refusal", Cohen's kappa and seconds per 100 verdicts of each judge
    against human labels; published judges beside them where the data has their verdicts."""
    from aird.core.artifacts import write_jsonl
    from aird.core.env import set_threads
    from aird.core.judges import validate
    from aird.core.plugins import registry

    with user_errors():
        if limit is not None and limit < 1:
            raise AirdError("--limit must be at least 1.")
        set_threads(threads)
        names = list(judges) if judges else [r.name for r in registry().of("scorer")]
        recs = validate(names, list(datasets), limit, seed, str(data_dir) if data_dir else None, RichReporter(),
                        {"judge_model": judge_model, "device": device}, skip_unready=not judges)
        console.print(table("judges against human labels (positive class: refusal)",
                            ["judge", "data set", "n", "accuracy", "precision", "recall", "F1", "kappa",
                             "s / 100"],
                            [(r["judge"], r["dataset"], r.get("n"), r.get("accuracy"), r.get("precision"),
                              r.get("recall"), r.get("f1"), r.get("kappa"), r.get("seconds_per_100"))
                             for r in recs]))
        if out:
            write_jsonl(Path(out) / "judges.jsonl", recs)
        if wants_json(json_out):
            emit(recs)


# ---- data -------------------------------------------------------------------------------------------------
@app.command("data")
def data_cmd(data_dir: Optional[Path] = DATA_DIR_OPT, json_out: bool = JSON_OPT) -> None:
    """List every data set aird knows: its role, rows, license, and where it is found (the data directory,
    the copy bundled with aird, or the hub)."""
    from aird.core.data import catalogue_status

    with user_errors():
        rows = [{"record": "data.set", **r} for r in catalogue_status(str(data_dir) if data_dir else None)]
        console.print(table("data sets", ["name", "role", "rows", "found", "license", "description"],
                            [(r["name"], r["role"], r["rows"] if r["rows"] is not None else "-", r["found"],
                              r["license"], r["description"]) for r in rows]))
        if wants_json(json_out):
            emit(rows)


# ---- probe ------------------------------------------------------------------------------------------------
def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-._" else "-" for c in Path(spec).name or spec).strip("-") or "model"


def _slugs(specs: list[str]) -> list[str]:
    """One distinct folder name per model: its own name, with its parent folder's where two share a name
    (runs/a/model and runs/b/model), and a counter where even that collides (the same model twice)."""
    names = [_slug(x) for x in specs]
    names = [_slug(str(Path(x).parent.name) + "-" + n) if names.count(n) > 1 else n for x, n in zip(specs, names)]
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


@app.command("probe")
def probe_cmd(
    model_arg: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="Same as --model."),
    model: str = typer.Option("default", "--model", "-m",
                              help="Named model, model folder, .gguf file, hub id, or - to read a path from stdin."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder [default: runs/probe-<model>]."),
    n_train: int = typer.Option(128, help="Harmful and harmless training prompts, each (seeded sample)."),
    n_val: int = typer.Option(32, help="Harmful and harmless validation prompts, each."),
    seed: int = typer.Option(42),
    batch_size: int = typer.Option(16),
    top_k: int = typer.Option(3, help="Score candidates in order of the attribution proxy until this many pass the filters."),
    max_scored: int = typer.Option(30, help="... or until this many have been scored."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Score every candidate (the reference behaviour; slow)."),
    filter_prompts: bool = typer.Option(True, "--filter/--no-filter",
                                        help="Keep harmful prompts the model refuses and harmless ones it answers."),
    layer_cutoff: float = typer.Option(0.8, help="Candidates must come from layers below cutoff × n_layers."),
    kl_threshold: float = typer.Option(0.1, help="Maximum KL on harmless prompts under ablation."),
    method: str = typer.Option("diff-in-means", help="Probe plugin (see `aird plugins`)."),
    system_prompt: Optional[str] = typer.Option(None, help="System prompt [default: the chat template's own]."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    threads: Optional[int] = THREADS_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force", help="Overwrite the artifacts in --out."),
    json_out: bool = JSON_OPT,
) -> None:
    """Find the refusal direction of a model: difference in means at every layer and post-instruction
    position, selected by bypass, induce and KL scores as in the reference pipeline."""
    from aird.core.env import set_threads
    from aird.core.loading import load_model
    from aird.core.probe import ProbeConfig, run_probe

    with user_errors():
        spec = model_arg or model
        if spec == "-":
            spec = read_ref_from_stdin()
        set_threads(threads)
        cfg = ProbeConfig(n_train=n_train, n_val=n_val, seed=seed, batch_size=batch_size, method=method,
                          filter_prompts=filter_prompts, layer_cutoff=layer_cutoff, kl_threshold=kl_threshold,
                          top_k=top_k, max_scored=max_scored, exhaustive=exhaustive, system_prompt=system_prompt,
                          data_dir=str(data_dir) if data_dir else None, device=device)
        cfg.validate()
        out = out or Path("runs") / f"probe-{_slug(spec)}"
        check_writable_folder(out)
        with console.status(f"loading {spec}"):
            lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        cfg.dtype = lm.info["dtype"]
        res = run_probe(lm, cfg, out, force=force, reporter=RichReporter())
        render_probe(res.summary, res.candidates, res.resumed)
        if wants_json(json_out):
            emit([res.summary])


# ---- compress ---------------------------------------------------------------------------------------------
@app.command("compress")
def compress_cmd(
    model_arg: Optional[str] = typer.Argument(None, metavar="[MODEL]", help="Same as --model."),
    model: str = typer.Option("default", "--model", "-m", help="Named model, model folder, .gguf file, hub id, or -."),
    method: str = typer.Option(..., "--method", help="Compressor plugin: magnitude, wanda, sparsegpt, rtn, gptq, awq, ..."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output model folder [default: runs/<model>-<method>]."),
    sparsity: Optional[float] = typer.Option(None, help="Pruning: share of weights set to zero, in [0, 1)."),
    pattern: Optional[str] = typer.Option(None, help="Pruning: N:M semi-structured (N non-zeros in every M), e.g. 2:4."),
    bits: Optional[int] = typer.Option(None, help="Quantization: weight bits (4 or 8)."),
    group_size: Optional[int] = typer.Option(None, help="Quantization: weights per scale along the input dimension."),
    calib: str = typer.Option("harmless", help="Calibration data: harmless (chat-formatted instructions) or wikitext."),
    calib_samples: int = typer.Option(64, help="Calibration samples."),
    calib_seq_len: int = typer.Option(512, help="Maximum tokens per calibration sample."),
    fmt: str = typer.Option("auto", "--format", help="Quantizers' folder format: dense (quantize-dequantized weights "
                            "in the torch dtype, loads anywhere), compressed-tensors (packed low-bit weights, for "
                            "vLLM), or auto (compressed-tensors on CUDA, dense on a CPU)."),
    seed: int = typer.Option(42),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    threads: Optional[int] = THREADS_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force", help="Replace the model in --out."),
    json_out: bool = JSON_OPT,
) -> None:
    """Prune or quantize a model with a compressor plugin and write a model folder that loads like the
    original, with compress.jsonl measuring the achieved sparsity and bits from the written weights."""
    from aird.core.compress import CompressConfig, run_compress
    from aird.core.env import set_threads
    from aird.core.loading import load_model
    from aird.core.plugins import get

    with user_errors():
        spec = model_arg or model
        if spec == "-":
            spec = read_ref_from_stdin()
        get("compressor", method)  # an unknown method fails before the model loads
        set_threads(threads)
        given = {"sparsity": sparsity, "pattern": pattern, "bits": bits, "group_size": group_size}
        cfg = CompressConfig(method=method, params={k: v for k, v in given.items() if v is not None}, calib=calib,
                             calib_samples=calib_samples, calib_seq_len=calib_seq_len, seed=seed,
                             data_dir=str(data_dir) if data_dir else None, device=device, format=fmt)
        suffix = "-".join(str(v).replace(":", "of") for v in given.values() if v is not None)
        out = out or Path("runs") / f"{_slug(spec)}-{method}{'-' + suffix if suffix else ''}"
        check_writable_folder(out)
        with console.status(f"loading {spec}"):
            lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        res = run_compress(lm, cfg, out, force=force, reporter=RichReporter())
        render_compress(res.summary, res.resumed)
        if wants_json(json_out):
            emit([res.summary])


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


# ---- diff -------------------------------------------------------------------------------------------------
@app.command("diff")
def diff_cmd(
    original: Path = typer.Argument(..., help="Probe folder of the original model."),
    compressed: str = typer.Argument(..., help="Probe folder of the compressed model, or - to read it from stdin."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder [default: COMPRESSED/diff]."),
    score: bool = typer.Option(True, "--score/--no-score",
                               help="Also score the original direction inside the compressed model (loads it)."),
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    threads: Optional[int] = THREADS_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = JSON_OPT,
) -> None:
    """How compression moved the refusal direction: cosine by layer and position, source, quality."""
    from aird.core.diff import open_probe, run_diff
    from aird.core.env import set_threads
    from aird.core.loading import load_model

    with user_errors():
        comp = Path(read_ref_from_stdin() if compressed == "-" else compressed)
        if out is not None:
            check_writable_folder(out)
        set_threads(threads)
        lm = None
        if score:
            path = open_probe(comp).summary["config"]["model_path"]
            with console.status(f"loading {path}"):
                lm = load_model(path, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        s = run_diff(original, comp, out, lm=lm, force=force, reporter=RichReporter())
        render_diff(s)
        if wants_json(json_out):
            emit([s])


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


# ---- repair -----------------------------------------------------------------------------------------------
@app.command("repair")
def repair_cmd(
    compressed: str = typer.Argument(..., help="The compressed model folder (or - to read it from stdin)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="Probe folder of the ORIGINAL model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output model folder [default: COMPRESSED-aird]."),
    method: str = typer.Option("aird", help="Repair plugin: aird (dense rank-one), aird-sparse (keeps sparsity), "
                                            "aird-ridge or aird-ridge-sparse (fitted to the original's projections)."),
    layer: str = typer.Option("default", help="Layer to edit: a number, default (the one below the source), or auto "
                                              "(the matrices that write r̂ most selectively on harmful prompts)."),
    matrix: str = typer.Option("both", help="attn (o_proj), mlp (down_proj) or both (with --layer auto: either)."),
    alpha: str = typer.Option("auto", help="Edit strength, or auto (smallest that restores the refusal rate)."),
    judge: str = typer.Option("generate", help="How α auto judges refusal: generate (greedy answers and the scorer, "
                                               "as eval does) or score (first-token refusal score > 0; cheaper)."),
    candidates: int = typer.Option(2, help="With --layer auto: how many of the best-ranked matrices to search."),
    refine: int = typer.Option(2, help="--alpha auto with the generate judge: bisections between the last two grid "
                               "values (each costs one validation run)."),
    max_new_tokens: int = typer.Option(24, help="Answer length of the generate judge."),
    scorer: str = typer.Option("substring", help="Scorer plugin of the generate judge."),
    compressed_probe: Optional[Path] = typer.Option(None, help="Probe folder of the compressed model (its source layer)."),
    guard: float = typer.Option(0.02, help="Allowed rise of the harmless refusal rate."),
    tune_on: Optional[list[str]] = typer.Option(None, "--tune-on", help="Sets α is searched on (harmful and benign; "
                                                "see `aird data`) [default: the probe's validation splits]."),
    tune_limit: int = typer.Option(32, help="Prompts per --tune-on set (stratified, seeded)."),
    check_on: Optional[list[str]] = typer.Option(None, "--check-on", help="Sets the repair is checked on after it "
                                                 "is chosen, with every prompt the probe or the tuning saw left out; "
                                                 "'none' skips [default: jailbreakbench xstest_unsafe "
                                                 "jailbreakbench_benign xstest_safe]."),
    check_limit: int = typer.Option(50, help="Prompts per --check-on set (stratified, seeded)."),
    ridge: Optional[float] = typer.Option(None, help="Fitting methods: relative ridge [default: chosen by "
                                                     "cross-validation over whole prompts]."),
    batch_size: int = typer.Option(16),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    threads: Optional[int] = THREADS_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = JSON_OPT,
) -> None:
    """AIRD: re-induce the original model's refusal direction in a compressed model by a rank-one edit of one
    residual-writing matrix of one layer."""
    from aird.core.env import set_threads
    from aird.core.loading import load_model
    from aird.core.plugins import get
    from aird.core.repair import RepairConfig, run_repair

    with user_errors():
        spec = read_ref_from_stdin() if compressed == "-" else compressed
        get("repair", method)
        set_threads(threads)
        lay = None if layer == "default" else (layer if layer == "auto" else _int(layer, "--layer"))
        cfg = RepairConfig(method=method, layer=lay, matrix=matrix, alpha=alpha, guard=guard, judge=judge,
                           candidates=candidates, refine=refine, max_new_tokens=max_new_tokens, scorer=scorer,
                           compressed_probe=str(compressed_probe) if compressed_probe else None,
                           tune_on=list(tune_on) if tune_on else None, tune_limit=tune_limit,
                           check_limit=check_limit, ridge=ridge,
                           batch_size=batch_size, data_dir=str(data_dir) if data_dir else None, device=device)
        if check_on:
            cfg.check_on = [] if check_on == ["none"] else list(check_on)
        cfg.validate()
        out = out or Path(f"{spec.rstrip('/')}-{method}")
        check_writable_folder(out)
        with console.status(f"loading {spec}"):
            lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        s = run_repair(lm, reference, cfg, out, force=force, reporter=RichReporter())
        render_repair(s)
        if wants_json(json_out):
            emit([s])


def _int(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AirdError(f"{option} must be a whole number, auto or default, not {value!r}.") from None


def render_repair(s: dict) -> None:
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
    check = s.get("check")
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


# ---- eval -------------------------------------------------------------------------------------------------
@app.command("eval")
def eval_cmd(
    models: list[str] = typer.Option(["default"], "--model", "-m", help="Model(s) to evaluate; repeat to compare. - reads stdin."),
    suite: str = typer.Option("safety", help="safety (ASR, over-refusal), utility (zero-shot accuracy through "
                                             "lm-eval, WikiText-2 perplexity), or all."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder [default: runs/eval]; one subfolder per model when several."),
    limit: Optional[int] = typer.Option(None, help="At most this many prompts per set and examples per zero-shot "
                                                   "task (quick runs; recorded)."),
    task_limit: Optional[int] = typer.Option(None, help="Examples per zero-shot task, when it should differ from --limit."),
    alpaca_n: int = typer.Option(100, help="Alpaca instructions (a seeded sample of 31,323) scored for over-refusal."),
    selection: str = typer.Option("stratified", help="How --limit picks prompts: stratified (a seeded sample spread "
                                                     "over the categories) or first (the first N)."),
    tasks: list[str] = typer.Option(["arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq", "winogrande",
                                     "openbookqa", "rte"], "--task", help="Zero-shot tasks (utility suite)."),
    harmful: Optional[list[str]] = typer.Option(None, help="Harmful sets (ASR); 'none' for none [default: advbench "
                                                "jailbreakbench, or none with --prompts]."),
    benign: Optional[list[str]] = typer.Option(None, help="Benign sets (over-refusal); 'none' for none [default: "
                                               "jailbreakbench_benign alpaca, or none with --prompts]."),
    jailbreaks: list[str] = typer.Option([], "--jailbreak", help="Jailbreak sets, each reported as its own attack: "
                                         "jbb_gcg, jbb_pair, jbb_aim, jbb_random_search, wild."),
    wild_templates: int = typer.Option(5, help="In-the-wild templates sampled for --jailbreak wild."),
    seen: Optional[list[str]] = typer.Option(None, "--seen", help="Sets the probe or the repair saw: their prompts, "
                                             "word for word or nearly, are left out of every evaluated set (counts "
                                             "recorded); 'none' keeps every prompt [default: harmful_train "
                                             "harmful_val harmless_train harmless_val]."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Your own prompt file: CSV, JSON or JSONL."),
    prompts_as: str = typer.Option("harmful", "--as", help="Score --prompts as harmful (ASR) or benign (over-refusal)."),
    column: Optional[str] = typer.Option(None, help="Text column of --prompts."),
    category_column: Optional[str] = typer.Option(None, help="Category column of --prompts."),
    max_new_tokens: int = typer.Option(64),
    scorer: str = typer.Option("substring", help="Scorer plugin that judges refusals."),
    judges: list[str] = typer.Option([], "--judge", help="More judges (scorer plugins), each verdict recorded beside "
                                     "the scorer's, with ASR under each and agreement (kappa) with the scorer."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", envvar="AIRD_JUDGE_MODEL",
                                              help="The llm judge's model [default: qwen2.5-coder-1.5b-instruct]."),
    ppl_windows: int = typer.Option(40, help="WikiText-2 windows of --ppl-ctx-len tokens (0: all)."),
    ppl_ctx_len: int = typer.Option(1024),
    batch_size: int = typer.Option(16),
    seed: int = typer.Option(42),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    dtype: str = DTYPE_OPT,
    threads: Optional[int] = THREADS_OPT,
    engine: str = ENGINE_OPT,
    tensor_parallel_size: Optional[int] = TP_OPT,
    pipeline_parallel_size: Optional[int] = PP_OPT,
    distributed_executor_backend: Optional[str] = EXECUTOR_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force"),
    json_out: bool = JSON_OPT,
) -> None:
    """Safety and utility of one or more models: ASR on AdvBench and JailbreakBench (overall and per
    category), over-refusal on benign prompts, WikiText-2 perplexity."""
    from aird.core.env import set_threads
    from aird.core.evaluate import EvalConfig, run_eval
    from aird.core.loading import load_model
    from aird.core.plugins import get

    with user_errors():
        specs = [read_ref_from_stdin() if m == "-" else m for m in models]
        suites = ("safety", "utility") if suite == "all" else (suite,)
        if suite not in ("safety", "utility", "all"):
            raise AirdError(f"--suite must be safety, utility or all, not {suite!r}.")
        for j in [scorer, *judges]:
            obj = get("scorer", j)
            if hasattr(obj, "configure"):
                obj.configure(judge_model=judge_model, device=device)
        set_threads(threads)
        from aird.core.evaluate import BENIGN_SETS, HARMFUL_SETS

        def chosen(given: Optional[list[str]], default: tuple[str, ...]) -> list[str]:
            if given is None:   # --prompts alone evaluates the file alone
                return [] if prompts else list(default)
            return [] if list(given) == ["none"] else list(given)

        cfg = EvalConfig(harmful=chosen(harmful, HARMFUL_SETS), benign=chosen(benign, BENIGN_SETS),
                         jailbreaks=list(jailbreaks),
                         wild_templates=wild_templates, prompts_file=str(prompts) if prompts else None,
                         prompts_as=prompts_as, column=column, category_column=category_column, limit=limit, alpaca_n=alpaca_n,
                         task_limit=task_limit, selection=selection,
                         max_new_tokens=max_new_tokens, scorer=scorer, judges=list(judges), ppl_windows=ppl_windows or None,
                         ppl_ctx_len=ppl_ctx_len, seed=seed, batch_size=batch_size, tasks=list(tasks),
                         data_dir=str(data_dir) if data_dir else None, device=device, engine=engine,
                         engine_options=engine_options(tensor_parallel_size, pipeline_parallel_size,
                                                       distributed_executor_backend))
        if engine != "auto":
            get("engine", engine)
        if seen:
            cfg.seen = [] if seen == ["none"] else list(seen)
        cfg.validate(suites)
        base = out or Path("runs") / "eval"
        check_writable_folder(base)
        summaries, folders, paired, names = [], [], [], _slugs(specs)
        for spec, name in zip(specs, names):
            with console.status(f"loading {spec}"):
                lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
            folders.append(base / name if len(specs) > 1 else base)
            summaries.append(run_eval(lm, cfg, folders[-1], suites, force=force, reporter=RichReporter()))
        if len(specs) > 1:
            from aird.core.evaluate import compare_runs
            from aird.core.plots import plot_asr

            if plot_asr(base / "asr_by_category.png", dict(zip(names, summaries))):
                console.print(f"ASR chart of all models: {base / 'asr_by_category.png'}", highlight=False)
            if "safety" in suites:
                paired = compare_runs(folders, names, base, seed)
        render_eval(names, summaries)
        render_paired(paired)
        if wants_json(json_out):
            emit([*summaries, *paired])


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


# ---- study ------------------------------------------------------------------------------------------------
@app.command("study")
def study_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to study [default: the profile's, default]."),
    quick: bool = typer.Option(False, "--quick", help="The quick profile: under 30 minutes on a 2-core CPU for the "
                                                      "0.5B default model (small sets; see the README)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="TOML file overriding keys of the profile "
                                                                         "(grid, probe, repair, eval, ...)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Study folder [default: runs/study-<model>-<profile>]."),
    seed: Optional[int] = typer.Option(None, help="Seed [default: 42]."),
    data_dir: Optional[Path] = DATA_DIR_OPT,
    device: str = DEVICE_OPT,
    threads: Optional[int] = THREADS_OPT,
    engine: Optional[str] = typer.Option(None, "--engine", envvar="AIRD_ENGINE", help="Generation engine of every "
                                         "evaluation: auto, hf, vllm or a plugin's [default: the config's eval.engine, "
                                         "else auto]."),
    tensor_parallel_size: Optional[int] = TP_OPT,
    pipeline_parallel_size: Optional[int] = PP_OPT,
    distributed_executor_backend: Optional[str] = EXECUTOR_OPT,
    trust_remote_code: bool = TRUST_OPT,
    force: bool = typer.Option(False, "--force", help="Start the study in --out again from nothing."),
    json_out: bool = JSON_OPT,
) -> None:
    """The paper's whole experiment: compress with a grid, probe every model, diff each against the original,
    repair the moved ones, evaluate all; writes report.md and report.html. Reruns reuse finished steps."""
    from aird.core.env import resolve_device, set_threads
    from aird.core.study import resolve_config, run_study

    with user_errors():
        profile = "quick" if quick else "full"
        set_threads(threads)
        cuda = resolve_device(device).type == "cuda"
        ev = {**({"engine": engine} if engine else {}),
              **({"engine_options": o} if (o := engine_options(tensor_parallel_size, pipeline_parallel_size,
                                                               distributed_executor_backend)) else {})}
        cfg = resolve_config(profile, config, {"model": model, "seed": seed, "eval": ev or None}, cuda=cuda)
        out = out or Path("runs") / f"study-{_slug(cfg['model'])}-{profile}"
        check_writable_folder(out)
        res = run_study(cfg, out, force=force, reporter=RichReporter(), device=device,
                        data_dir=str(data_dir) if data_dir else None, trust_remote_code=trust_remote_code)
        render_study(res)
        if wants_json(json_out):
            emit([{"record": "study.summary", "model": cfg["model"], "profile": profile, "out": str(res.out),
                   "report": str(res.report), "findings": res.findings, "seconds": res.seconds,
                   "steps": res.steps}])


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


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `aird ... | head` closes the pipe early
        sys.stderr.close()


if __name__ == "__main__":
    main()
