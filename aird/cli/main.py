"""`aird`: the Typer application. Each command parses its options, calls one core function and renders."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import typer

from rich.markup import escape

from aird import __version__
from aird.cli.render import (RichReporter, console, emit, read_ref_from_stdin, render_compress, render_diff,
                             render_eval, render_paired, render_probe, render_repair, render_study, table, wants_json)
from aird.core.configs import BENIGN_SETS, HARMFUL_SETS, CompressConfig, EvalConfig, LAYER_CHOICES, ProbeConfig, RepairConfig
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
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] rerun the same command to resume.")
        raise typer.Exit(130) from None
    except Terminated:
        console.print("[bold red]terminated:[/] rerun the same command to resume.")
        raise typer.Exit(143) from None
    except BrokenPipeError:
        # the reader of stdout went away (`aird data | head -1`): stop quietly, as a Unix filter does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(141) from None
    except Exception as exc:
        sentence = user_error_sentence(exc)
        if sentence is not None:
            console.print(f"[bold red]error:[/] {escape(sentence)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        log = write_crash_log(exc)
        console.print(f"[bold red]aird hit an internal error[/] ({type(exc).__name__}); the traceback is in {log}; "
                      "please report it.", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def from_stdin(value: str) -> str:
    """A model or folder argument: ``-`` reads it from stdin (a path, or the first JSONL record's path), as
    pipelines pass it."""
    return read_ref_from_stdin() if value == "-" else value


def load(spec: str, device: str, dtype: str, trust_remote_code: bool):
    """Load a model for a subcommand, with a spinner on stderr while it loads."""
    from aird.core.loading import load_model

    with console.status(f"loading {spec}"):
        return load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


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
    from aird.core.plugins import plugin_registry

    with user_errors():
        reg = plugin_registry()
        rows = [{"record": "plugin", "kind": r.kind, "name": r.name, "origin": r.origin, "version": r.version,
                 "plugin": r.plugin, "builtin": r.builtin, "description": getattr(r.obj, "description", ""),
                 "options": dict(getattr(r.obj, "params", None) or {})}
                for r in reg.items]
        broken = [{"record": "plugin.error", "plugin": b.plugin, "origin": b.origin, "error": b.error} for b in reg.broken]
        console.print(table("plugins", ["kind", "name", "origin", "version", "options (default)", "description"],
                            [(r["kind"], r["name"], "built-in" if r["builtin"] else r["origin"], r["version"],
                              " ".join(f"--{k.replace('_', '-')}" + ("" if v is None else f" {v}") for k, v in r["options"].items()),
                              r["description"]) for r in rows]))
        for b in broken:
            console.print(escape(f"plugin {b['plugin']} ({b['origin']}) failed to load: {b['error']}"), style="red", highlight=False)
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
    from aird.core.plugins import plugin_registry

    with user_errors():
        if limit is not None and limit < 1:
            raise AirdError("--limit must be at least 1.")
        set_threads(threads)
        names = list(judges) if judges else [r.name for r in plugin_registry().of("scorer")]
        recs = validate(names, list(datasets), limit, seed, str(data_dir) if data_dir else None, RichReporter(),
                        {"judge_model": judge_model, "device": device}, skip_unready=not judges)
        console.print(table("judges against human labels (positive class: refusal)",
                            ["judge", "data set", "n", "accuracy", "precision", "recall", "F1", "kappa",
                             "s / 100"],
                            [(r["judge"] + (" (cross-fitted)" if r.get("cross_fitted") else ""), r["dataset"],
                              r.get("n"), r.get("accuracy"), r.get("precision"),
                              r.get("recall"), r.get("f1"), r.get("kappa"), r.get("seconds_per_100"))
                             for r in recs]))
        if any(r.get("cross_fitted") for r in recs):
            console.print("cross-fitted: a judge trained on these labels judged each row with a fit that saw neither "
                          "its answering model nor its prompt.")
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
    n_train: int = typer.Option(ProbeConfig.n_train, help="Harmful and harmless training prompts, each (seeded sample)."),
    n_val: int = typer.Option(ProbeConfig.n_val, help="Harmful and harmless validation prompts, each."),
    seed: int = typer.Option(ProbeConfig.seed),
    batch_size: int = typer.Option(ProbeConfig.batch_size),
    top_k: int = typer.Option(ProbeConfig.top_k, help="Score candidates in order of the attribution proxy until this many pass the filters."),
    max_scored: int = typer.Option(ProbeConfig.max_scored, help="... or until this many have been scored."),
    exhaustive: bool = typer.Option(False, "--exhaustive", help="Score every candidate (the reference behaviour; slow)."),
    filter_prompts: bool = typer.Option(ProbeConfig.filter_prompts, "--filter/--no-filter",
                                        help="Keep harmful prompts the model refuses and harmless ones it answers."),
    layer_cutoff: float = typer.Option(ProbeConfig.layer_cutoff, help="Candidates must come from layers below cutoff × n_layers."),
    kl_threshold: float = typer.Option(ProbeConfig.kl_threshold, help="Maximum KL on harmless prompts under ablation."),
    method: str = typer.Option(ProbeConfig.method, help="Probe plugin (see `aird plugins`)."),
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
    from aird.core.probe import run_probe

    with user_errors():
        spec = from_stdin(model_arg or model)
        set_threads(threads)
        cfg = ProbeConfig(n_train=n_train, n_val=n_val, seed=seed, batch_size=batch_size, method=method,
                          filter_prompts=filter_prompts, layer_cutoff=layer_cutoff, kl_threshold=kl_threshold,
                          top_k=top_k, max_scored=max_scored, exhaustive=exhaustive, system_prompt=system_prompt,
                          data_dir=str(data_dir) if data_dir else None, device=device)
        cfg.validate()
        out = out or Path("runs") / f"probe-{_slug(spec)}"
        check_writable_folder(out)
        lm = load(spec, device, dtype, trust_remote_code)
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
    protect_refusal: bool = typer.Option(False, "--protect-refusal", help="Refusal-preserving variant of the method "
                                         "(wanda → wanda-rp, sparsegpt → sparsegpt-rp, gptq → gptq-rp): keeps what carries the --reference "
                                         "probe's refusal direction, at the same sparsity or bits (docs/compress.md)."),
    reference: Optional[Path] = typer.Option(None, "--reference", "-r", help="With --protect-refusal: the original "
                                             "model's probe folder (its direction, source and training prompts)."),
    protect: Optional[float] = typer.Option(None, "--protect", help="With --protect-refusal: weight of the refusal "
                                            "term against the method's own score or Hessian [default: 1]."),
    calib: str = typer.Option(CompressConfig.calib, help="Calibration data: harmless (chat-formatted instructions) or wikitext."),
    calib_samples: int = typer.Option(CompressConfig.calib_samples, help="Calibration samples."),
    calib_seq_len: int = typer.Option(CompressConfig.calib_seq_len, help="Maximum tokens per calibration sample."),
    fmt: str = typer.Option(CompressConfig.format, "--format", help="Quantizers' folder format: dense (quantize-dequantized weights "
                            "in the torch dtype, loads anywhere), compressed-tensors (packed low-bit weights, for "
                            "vLLM), or auto (compressed-tensors on CUDA, dense on a CPU)."),
    seed: int = typer.Option(CompressConfig.seed),
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
    from aird.core.compress import protected_method, run_compress, takes_reference
    from aird.core.env import set_threads
    from aird.core.plugins import get

    with user_errors():
        spec = from_stdin(model_arg or model)
        get("compressor", method)  # an unknown method fails before the model loads
        if protect_refusal:
            method = protected_method(method)
            if reference is None:
                raise AirdError("--protect-refusal needs --reference: the original model's probe folder.")
        if (reference is not None or protect is not None) and not takes_reference(method):
            raise AirdError(f"method {method} takes no --reference or --protect; add --protect-refusal for its "
                            "refusal-preserving variant.")
        if reference is not None:
            from aird.core.diff import open_probe

            open_probe(reference)   # a missing or broken probe folder fails before the model loads
        set_threads(threads)
        given = {"sparsity": sparsity, "pattern": pattern, "bits": bits, "group_size": group_size}
        extra = {"reference": str(reference.resolve()) if reference else None, "protect": protect}
        cfg = CompressConfig(method=method, params={k: v for k, v in {**given, **extra}.items() if v is not None}, calib=calib,
                             calib_samples=calib_samples, calib_seq_len=calib_seq_len, seed=seed,
                             data_dir=str(data_dir) if data_dir else None, device=device, format=fmt)
        suffix = "-".join(str(v).replace(":", "of") for v in given.values() if v is not None)
        out = out or Path("runs") / f"{_slug(spec)}-{method}{'-' + suffix if suffix else ''}"
        check_writable_folder(out)
        lm = load(spec, device, dtype, trust_remote_code)
        res = run_compress(lm, cfg, out, force=force, reporter=RichReporter())
        render_compress(res.summary, res.resumed)
        if wants_json(json_out):
            emit([res.summary])


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

    with user_errors():
        comp = Path(from_stdin(compressed))
        if out is not None:
            check_writable_folder(out)
        set_threads(threads)
        lm = None
        if score:
            path = open_probe(comp).summary["config"]["model_path"]
            lm = load(path, device, dtype, trust_remote_code)
        s = run_diff(original, comp, out, lm=lm, force=force, reporter=RichReporter())
        render_diff(s)
        if wants_json(json_out):
            emit([s])


# ---- repair -----------------------------------------------------------------------------------------------
@app.command("repair")
def repair_cmd(
    compressed: str = typer.Argument(..., help="The compressed model folder (or - to read it from stdin)."),
    reference: Path = typer.Option(..., "--reference", "-r", help="Probe folder of the ORIGINAL model."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output model folder [default: COMPRESSED-METHOD]."),
    method: str = typer.Option(RepairConfig.method, help="Repair plugin: aird-ridge (fitted to the original's projections; dense) "
                                            "or aird-ridge-sparse (keeps sparsity), aird (the paper's edit: amplifies what "
                                            "the matrix writes along r̂) or aird-sparse, aird-grid or aird-ridge-grid "
                                            "(quantized models: stays on their grid), aird-subspace (rank 64: fitted "
                                            "to the original's residual in the directions compression changed most; "
                                            "dense)."),
    layer: str = typer.Option("default", help="Layer to edit: a number, default (the one below the source), "
                                              "selective (the matrices that write r̂ most selectively on harmful "
                                              "prompts), gap (the blocks where compression took away most of the "
                                              "harmful-minus-harmless separation along r̂; loads the original model) "
                                              "or auto (the method's own: selective for aird and aird-sparse, gap "
                                              "for the ridge methods)."),
    matrix: str = typer.Option(RepairConfig.matrix, help="attn (o_proj), mlp (down_proj) or both (with --layer selective: either)."),
    alpha: str = typer.Option(RepairConfig.alpha, help="Edit strength, or auto (smallest that restores the refusal rate)."),
    judge: str = typer.Option(RepairConfig.judge, help="How α auto judges refusal: generate (greedy answers and the scorer, "
                                               "as eval does) or score (first-token refusal score > 0; cheaper)."),
    candidates: int = typer.Option(RepairConfig.candidates, help="With --layer selective, gap or auto: how many of the best-ranked matrices (selective) or blocks (gap) to search."),
    refine: int = typer.Option(RepairConfig.refine, help="--alpha auto with the generate judge: bisections between the last two grid "
                               "values (each costs one validation run)."),
    max_new_tokens: int = typer.Option(RepairConfig.max_new_tokens, help="Answer length of the generate judge."),
    scorer: str = typer.Option(RepairConfig.scorer, help="Scorer plugin of the generate judge."),
    compressed_probe: Optional[Path] = typer.Option(None, help="Probe folder of the compressed model (its source layer)."),
    guard: float = typer.Option(RepairConfig.guard, help="Allowed rise of the harmless refusal rate."),
    guard_from: str = typer.Option(RepairConfig.guard_from, help="What the guard allows a rise over: larger (the "
                                   "original's or the compressed model's harmless refusal rate, whichever is higher) "
                                   "or original (the original model's: the repair must also undo compression's "
                                   "over-refusal)."),
    guard_on: str = typer.Option(RepairConfig.guard_on, help="What the guard bounds: rate (the harmless refusal "
                                 "rate may rise --guard) or score (the mean harmless first-token refusal score may "
                                 "rise --guard × the original's harmful − harmless score gap; not decided by one "
                                 "answer flipping)."),
    tune_on: Optional[list[str]] = typer.Option(None, "--tune-on", help="Sets α is searched on (harmful and benign; "
                                                "see `aird data`) [default: the probe's validation splits]."),
    tune_limit: int = typer.Option(RepairConfig.tune_limit, help="Prompts per --tune-on set (stratified, seeded)."),
    fit_on: Optional[list[str]] = typer.Option(None, "--fit-on", help="Fitting and compensating methods: sets whose "
                                               "prompts join the probe's training prompts in the fit (they count as "
                                               "seen) [default: none]."),
    fit_limit: int = typer.Option(RepairConfig.fit_limit, help="Prompts per --fit-on set (stratified, seeded)."),
    check_on: Optional[list[str]] = typer.Option(None, "--check-on", help="Sets the repair is checked on after it "
                                                 "is chosen, with every prompt the probe or the tuning saw left out; "
                                                 "'none' skips [default: jailbreakbench xstest_unsafe "
                                                 "jailbreakbench_benign xstest_safe]."),
    check_limit: int = typer.Option(RepairConfig.check_limit, help="Prompts per --check-on set (stratified, seeded)."),
    ridge: Optional[float] = typer.Option(None, help="Fitting methods: relative ridge [default: chosen by "
                                                     "cross-validation over whole prompts]."),
    fit_positions: str = typer.Option(RepairConfig.fit_positions, help="Fitting methods: the tokens of each "
                                      "calibration prompt fitted: post (the post-instruction tokens, where the "
                                      "reply is decided) or all."),
    fit_text: int = typer.Option(RepairConfig.fit_text, help="aird-compensate: windows of 128 plain-text tokens "
                                 "(the end of WikiText-2's test text) beside the prompts in its calibration."),
    post_weight: float = typer.Option(RepairConfig.post_weight, help="aird-compensate*: how many times each "
                                      "prompt's post-instruction tokens (where the reply is decided) count in the "
                                      "block fits, against 1 for every other token."),
    batch_size: int = typer.Option(RepairConfig.batch_size),
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
    from aird.core.plugins import get
    from aird.core.repair import run_repair

    with user_errors():
        spec = from_stdin(compressed)
        get("repair", method)
        set_threads(threads)
        lay = None if layer == "default" else (layer if layer in LAYER_CHOICES else _int(layer, "--layer"))
        cfg = RepairConfig(method=method, layer=lay, matrix=matrix, alpha=alpha, guard=guard, guard_from=guard_from, guard_on=guard_on,
                           judge=judge,
                           candidates=candidates, refine=refine, max_new_tokens=max_new_tokens, scorer=scorer,
                           compressed_probe=str(compressed_probe) if compressed_probe else None,
                           tune_on=list(tune_on) if tune_on else None, tune_limit=tune_limit,
                           fit_on=list(fit_on) if fit_on else None, fit_limit=fit_limit,
                           check_limit=check_limit, ridge=ridge, fit_positions=fit_positions, fit_text=fit_text,
                           post_weight=post_weight, batch_size=batch_size, data_dir=str(data_dir) if data_dir else None, device=device)
        if check_on:
            cfg.check_on = [] if check_on == ["none"] else list(check_on)
        cfg.validate()
        out = out or Path(f"{spec.rstrip('/')}-{method}")
        check_writable_folder(out)
        lm = load(spec, device, dtype, trust_remote_code)
        s = run_repair(lm, reference, cfg, out, force=force, reporter=RichReporter())
        render_repair(s)
        if wants_json(json_out):
            emit([s])


def _int(value: str, option: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise AirdError(f"{option} must be a whole number, default, {', '.join(LAYER_CHOICES)}, not {value!r}.") from None


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
    alpaca_n: int = typer.Option(EvalConfig.alpaca_n, help="Alpaca instructions (a seeded sample of 31,323) scored for over-refusal."),
    selection: str = typer.Option(EvalConfig.selection, help="How --limit picks prompts: stratified (a seeded sample spread "
                                                     "over the categories) or first (the first N)."),
    tasks: Optional[list[str]] = typer.Option(None, "--task", help="Zero-shot tasks (utility suite) [default: every task aird knows: ARC-e/c, HellaSwag, PIQA, BoolQ, WinoGrande, OpenBookQA, RTE]."),
    harmful: Optional[list[str]] = typer.Option(None, help="Harmful sets (ASR); 'none' for none [default: advbench "
                                                "jailbreakbench xstest_unsafe, or none with --prompts]."),
    benign: Optional[list[str]] = typer.Option(None, help="Benign sets (over-refusal); 'none' for none [default: "
                                               "jailbreakbench_benign xstest_safe alpaca, or none with --prompts]."),
    jailbreaks: list[str] = typer.Option([], "--jailbreak", help="Jailbreak sets, each reported as its own attack: "
                                         "jbb_gcg, jbb_pair, jbb_aim, jbb_random_search, wild."),
    wild_templates: int = typer.Option(EvalConfig.wild_templates, help="In-the-wild templates sampled for --jailbreak wild."),
    seen: Optional[list[str]] = typer.Option(None, "--seen", help="Sets the probe or the repair saw: their prompts, "
                                             "word for word or nearly, are left out of every evaluated set (counts "
                                             "recorded); 'none' keeps every prompt [default: harmful_train "
                                             "harmful_val harmless_train harmless_val]."),
    prompts: Optional[Path] = typer.Option(None, "--prompts", help="Your own prompt file: CSV, JSON or JSONL."),
    prompts_as: str = typer.Option(EvalConfig.prompts_as, "--as", help="Score --prompts as harmful (ASR) or benign (over-refusal)."),
    column: Optional[str] = typer.Option(None, help="Text column of --prompts."),
    category_column: Optional[str] = typer.Option(None, help="Category column of --prompts."),
    max_new_tokens: int = typer.Option(EvalConfig.max_new_tokens),
    scorer: str = typer.Option("classifier", envvar="AIRD_SCORER",
                               help="Scorer plugin (judge) whose verdicts make ASR and over-refusal; the substring "
                                    "judge's verdicts are recorded beside any other's."),
    judges: list[str] = typer.Option([], "--judge", help="More judges (scorer plugins), each verdict recorded beside "
                                     "the scorer's, with ASR under each and agreement (kappa) with the scorer."),
    judge_model: Optional[str] = typer.Option(None, "--judge-model", envvar="AIRD_JUDGE_MODEL",
                                              help="The llm judge's model [default: qwen2.5-coder-1.5b-instruct]."),
    ppl_windows: int = typer.Option(EvalConfig.ppl_windows, help="WikiText-2 windows of --ppl-ctx-len tokens (0: all)."),
    ppl_ctx_len: int = typer.Option(EvalConfig.ppl_ctx_len),
    batch_size: int = typer.Option(EvalConfig.batch_size),
    seed: int = typer.Option(EvalConfig.seed),
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
    from aird.core.evaluate import run_eval
    from aird.core.plugins import get

    with user_errors():
        specs = [from_stdin(m) for m in models]
        suites = ("safety", "utility") if suite == "all" else (suite,)
        if suite not in ("safety", "utility", "all"):
            raise AirdError(f"--suite must be safety, utility or all, not {suite!r}.")
        for j in [scorer, *judges]:
            obj = get("scorer", j)
            if hasattr(obj, "configure"):
                obj.configure(judge_model=judge_model, device=device)
        set_threads(threads)

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
                         ppl_ctx_len=ppl_ctx_len, seed=seed, batch_size=batch_size,
                         data_dir=str(data_dir) if data_dir else None, device=device, engine=engine,
                         engine_options=engine_options(tensor_parallel_size, pipeline_parallel_size,
                                                       distributed_executor_backend))
        if engine != "auto":
            get("engine", engine)
        if tasks:
            cfg.tasks = list(tasks)
        if seen:
            cfg.seen = [] if seen == ["none"] else list(seen)
        cfg.validate(suites)
        base = out or Path("runs") / "eval"
        check_writable_folder(base)
        summaries, folders, paired, names = [], [], [], _slugs(specs)
        for spec, name in zip(specs, names):
            lm = load(spec, device, dtype, trust_remote_code)
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


# ---- study ------------------------------------------------------------------------------------------------
@app.command("study")
def study_cmd(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model to study [default: the profile's, default]."),
    quick: bool = typer.Option(False, "--quick", help="The quick profile: about 30 minutes on a 2-core CPU for the "
                                                      "0.5B default model (see docs/study.md)."),
    profile: Optional[str] = typer.Option(None, "--profile", help="quick, standard (the study whose verdicts count: "
                                          "every prompt, eight compressed models) or full (the paper's sizes) "
                                          "[default: full; --quick is --profile quick]."),
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
    drop_models: bool = typer.Option(False, "--drop-models", help="Remove each compressed and repaired model's "
                                     "weights once its steps are done (their sha256 kept for the cards): one "
                                     "model's folders on disk at a time (study key keep_models = false)."),
    force: bool = typer.Option(False, "--force", help="Start the study in --out again from nothing."),
    report_only: bool = typer.Option(False, "--report-only", help="Write the report of the models the study in "
                                     "--out has finished so far, with its stored configuration: runs nothing, "
                                     "loads no model, works while the study runs."),
    json_out: bool = JSON_OPT,
) -> None:
    """The paper's whole experiment: compress with a grid, probe every model, diff each against the original,
    repair the moved ones, evaluate all; writes report.md and report.html. Reruns reuse finished steps."""
    from aird.core.env import resolve_device, set_threads
    from aird.core.study import report_study, resolve_config, run_study

    with user_errors():
        if report_only and force:
            raise AirdError("--report-only runs nothing; it cannot be combined with --force.")
        if quick and profile not in (None, "quick"):
            raise AirdError(f"--quick and --profile {profile} disagree; give one of them.")
        profile = "quick" if quick else profile or "full"
        set_threads(threads)
        cuda = resolve_device(device).type == "cuda"
        ev = {**({"engine": engine} if engine else {}),
              **({"engine_options": o} if (o := engine_options(tensor_parallel_size, pipeline_parallel_size,
                                                               distributed_executor_backend)) else {})}
        cfg = resolve_config(profile, config, {"model": model, "seed": seed, "eval": ev or None,
                                               "keep_models": False if drop_models else None}, cuda=cuda)
        out = out or Path("runs") / f"study-{_slug(cfg['model'])}-{profile}"
        check_writable_folder(out)
        if report_only:
            res = report_study(out)
            cfg, profile = res.config, res.config.get("profile", profile)
        else:
            res = run_study(cfg, out, force=force, reporter=RichReporter(), device=device,
                            data_dir=str(data_dir) if data_dir else None, trust_remote_code=trust_remote_code)
        render_study(res)
        if wants_json(json_out):
            emit([{"record": "study.summary", "model": cfg["model"], "profile": profile, "out": str(res.out),
                   "report": str(res.report), "findings": res.findings, "seconds": res.seconds,
                   "steps": res.steps, "pending": res.pending}])


def main() -> None:
    try:
        app()
    except BrokenPipeError:  # `aird ... | head` closes the pipe early
        sys.stderr.close()


if __name__ == "__main__":
    main()
