"""`aird compress`: run a compressor plugin on a model and write a model folder every other subcommand loads.

The plugin changes the model's weights in place (pruned or quantize-dequantized values in the torch dtype);
the core validates the options, builds the calibration set, writes the folder, and measures what was
achieved from the written weights: sparsity, N:M compliance, bits (distinct values per group), error.
"""

from __future__ import annotations

import resource
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from safetensors.torch import save_file

from aird.core import plugins
from aird.core.artifacts import (Run, Stopwatch, disk_full_as_error, finished_model_folder, require_free_space,
                                 tensor_bytes, write_jsonl)
from aird.core.data import load_set, sample, wikitext_text
from aird.core.errors import AirdError
from aird.core.loading import LoadedModel, save_model_folder
from aird.core.measure import LazyTensors, decoder_linear_weights, summarize
from aird.core.configs import CompressConfig  # noqa: F401  (re-exported)
from aird.core.progress import Reporter, reporting
from aird.core.reliability import clean_stale_scratch, scratch_prefix

COMPRESS_JSONL = "compress.jsonl"
NON_SEMANTIC = ("device", "data_dir", "threads")


@dataclass
class Calibration:
    """Calibration inputs: token ids per sample (no padding), and the texts they came from."""

    texts: list[str]
    input_ids: list[list[int]]
    source: str

    def dataset(self):
        """The samples as a `datasets.Dataset` with input_ids/attention_mask (what llm-compressor takes)."""
        from datasets import Dataset

        return Dataset.from_dict({"input_ids": self.input_ids, "attention_mask": [[1] * len(x) for x in self.input_ids]})

    @property
    def n_tokens(self) -> int:
        return sum(map(len, self.input_ids))


FORMATS = ("auto", "dense", "compressed-tensors")


def resolve_format(fmt: str, plugin, lm: LoadedModel) -> str:
    """The folder format: quantize-dequantized weights in the torch dtype ("dense", loads anywhere), or
    compressed-tensors (packed low-bit weights with their scales, what vLLM's kernels run), written by a plugin
    that has ``save_compressed``. ``auto`` takes compressed-tensors on CUDA, where low-bit kernels exist, and
    dense on a CPU, where none runs faster than the float weights."""
    if fmt not in FORMATS:
        raise AirdError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")
    can = callable(getattr(plugin, "save_compressed", None))
    if fmt == "auto":
        return "compressed-tensors" if can and lm.device.type == "cuda" else "dense"
    if fmt == "compressed-tensors" and not can:
        raise AirdError(f"method {plugin.name} has no compressed-tensors format (only the quantizers do); "
                        "use --format dense.")
    return fmt


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'N:M' = at most N non-zeros in every M consecutive weights along the input dimension (2:4 = 50%)."""
    if pattern in (None, "", "unstructured"):
        return None
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise AirdError(f"pattern {pattern!r} is not of the form N:M (e.g. 2:4).") from None
    if not 0 < n < m:
        raise AirdError(f"pattern {pattern}: N must be at least 1 and smaller than M.")
    return n, m


PROTECTED_SUFFIX = "-rp"


def protected_method(method: str) -> str:
    """The refusal-preserving variant of a compressor (``--protect-refusal``): the plugin named ``<method>-rp``."""
    if method.endswith(PROTECTED_SUFFIX):
        return method
    have = sorted(r.name for r in plugins.plugin_registry().of("compressor") if r.name.endswith(PROTECTED_SUFFIX))
    name = method + PROTECTED_SUFFIX
    if name not in have:
        raise AirdError(f"method {method} has no refusal-preserving variant; --protect-refusal works with "
                        f"{', '.join(n[: -len(PROTECTED_SUFFIX)] for n in have) or 'no installed method'}.")
    return name


def takes_reference(method: str) -> bool:
    """Whether a compressor reads the original model's probe (its ``reference`` parameter): the refusal-preserving
    ones, whose reference a study fills with its own original probe."""
    return "reference" in getattr(plugins.get("compressor", method), "params", {})


def plain_method(method: str) -> str:
    """The plain compressor a refusal-preserving one varies (``wanda-rp`` → ``wanda``); any other method is its
    own plain one."""
    if method.endswith(PROTECTED_SUFFIX) and takes_reference(method):
        return method[: -len(PROTECTED_SUFFIX)]
    return method


def _linear_input_dims(lm: LoadedModel) -> list[int]:
    """The input widths of the decoder layers' linear layers (what group sizes and N:M must divide)."""
    return sorted({mod.in_features for _i, _name, mod in lm.adapter.linears(lm.model)})


def resolve_params(plugin, given: dict, lm: LoadedModel) -> dict:
    """Fill the plugin's defaults, refuse options it does not take, validate the values against the model."""
    accepted = dict(getattr(plugin, "params", {}))
    unknown = sorted(k for k, v in given.items() if v is not None and k not in accepted)
    if unknown:
        takes = ", ".join("--" + k.replace("_", "-") for k in accepted) or "no options"
        raise AirdError(f"method {plugin.name} does not take {', '.join('--' + k.replace('_', '-') for k in unknown)}; it takes {takes}.")
    for k, v in given.items():   # a value of another type than the plugin's default (a study file's "0.5")
        d = accepted.get(k)
        ok = (d is None or v is None or (isinstance(d, bool) and isinstance(v, bool))
              or (not isinstance(d, bool) and isinstance(d, (int, float)) and isinstance(v, (int, float))
                  and not isinstance(v, bool))
              or (not isinstance(d, (bool, int, float)) and isinstance(v, type(d))))
        if not ok:
            raise AirdError(f"method {plugin.name}: --{k.replace('_', '-')} must be a {type(d).__name__} like its "
                            f"default {d!r}, not {v!r}.")
    params = {**accepted, **{k: v for k, v in given.items() if v is not None}}
    nm = parse_pattern(params.get("pattern")) if "pattern" in params else None
    if "sparsity" in params:
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if given.get("sparsity") is not None and abs(given["sparsity"] - implied) > 1e-9:
                raise AirdError(f"pattern {params['pattern']} means sparsity {implied:g}; drop --sparsity or make it match.")
            params["sparsity"] = implied
        s = params["sparsity"]
        if not isinstance(s, (int, float)) or not 0 <= s < 1:
            raise AirdError(f"sparsity must be in [0, 1), got {s}.")
    if "bits" in params:
        allowed = getattr(plugin, "bits_allowed", (2, 3, 4, 8))
        if params["bits"] not in allowed:
            raise AirdError(f"method {plugin.name} quantizes to {', '.join(map(str, allowed))} bits, not {params['bits']}.")
    if params.get("group_size") is not None:
        g = params["group_size"]
        if g <= 0:
            raise AirdError("group size must be positive.")
        bad = [d for d in _linear_input_dims(lm) if d % g]
        if bad:
            raise AirdError(f"group size {g} does not divide the input dimension {bad[0]} of the model's linear layers.")
    if nm is not None:
        bad = [d for d in _linear_input_dims(lm) if d % nm[1]]
        if bad:
            raise AirdError(f"pattern {params['pattern']}: M={nm[1]} does not divide the input dimension {bad[0]}.")
    return params


def calibration_set(lm: LoadedModel, cfg: CompressConfig) -> Calibration:
    """Seeded calibration samples: chat-formatted harmless instructions (the reference harmless test split,
    disjoint from the probe's train/val prompts) or consecutive chunks of WikiText-2 test."""
    tok = lm.tokenizer
    if cfg.calib == "harmless":
        prompts = sample(load_set("harmless_test", cfg.data_dir), cfg.calib_samples, cfg.seed)
        texts = [lm.adapter.format(tok, p.instruction) for p in prompts]
        ids = [tok(t, add_special_tokens=False)["input_ids"][: cfg.calib_seq_len] for t in texts]
        return Calibration(texts, ids, "harmless_test")
    if cfg.calib == "wikitext":
        all_ids = tok(wikitext_text(cfg.data_dir), add_special_tokens=False)["input_ids"]
        L = cfg.calib_seq_len
        starts = list(range(0, len(all_ids) - L, L))
        g = torch.Generator().manual_seed(cfg.seed)
        pick = [starts[i] for i in torch.randperm(len(starts), generator=g)[: cfg.calib_samples].tolist()]
        ids = [all_ids[s : s + L] for s in pick]
        return Calibration([tok.decode(x) for x in ids], ids, "wikitext2_test")
    raise AirdError(f"unknown calibration set {cfg.calib!r}; use harmless or wikitext.")


@dataclass
class CompressResult:
    out: Path
    summary: dict
    resumed: bool = False


def _unpacked_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The decoder Linear weights of a compressed-tensors folder, dequantized by transformers' own loader."""
    from aird.core.loading import load_model

    lm = load_model(str(folder), device="cpu")
    return {k: v.detach().clone() for k, v in decoder_linear_weights(lm.model.state_dict()).items()}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_compress(lm: LoadedModel, cfg: CompressConfig, out: Path, force: bool = False,
                 reporter: Reporter | None = None) -> CompressResult:
    """See _run_compress; one run at a time per output folder (a second one fails at once)."""
    from aird.core.reliability import out_lock

    with out_lock(Path(out), beside=True):
        return _run_compress(lm=lm, cfg=cfg, out=out, force=force, reporter=reporter)


def _run_compress(lm: LoadedModel, cfg: CompressConfig, out: Path, force: bool = False,
                  reporter: Reporter | None = None) -> CompressResult:
    rep = reporter or Reporter()
    plugin = plugins.get("compressor", cfg.method)
    params = resolve_params(plugin, cfg.params, lm)
    if cfg.calib_samples < 1 or cfg.calib_seq_len < 8:
        raise AirdError("--calib-samples must be at least 1 and --calib-seq-len at least 8.")
    out = Path(out)
    fmt = resolve_format(cfg.format, plugin, lm)
    config = {"model_path": lm.path, "model_fingerprint": lm.info.get("fingerprint"), **asdict(cfg), "params": params, "format": fmt}
    done = finished_model_folder(out, COMPRESS_JSONL, "compress.summary", config, force, ignore=NON_SEMANTIC)
    if done is not None:
        return CompressResult(out, done, resumed=True)

    # the original weights wait on disk beside the output, not in memory: peak RAM stays near one copy of the
    # model. Both that copy and the written model must fit: say so now, not after minutes of compressing.
    sd = lm.model.state_dict()
    linear = decoder_linear_weights(sd)
    out.parent.mkdir(parents=True, exist_ok=True)
    # a compression killed with SIGKILL leaves its scratch (a copy of the weights) behind: removed here
    clean_stale_scratch(out.parent, "compress")
    require_free_space(out.parent, tensor_bytes(sd.values()) + tensor_bytes(linear.values()),
                       f"compressing into {out} (the written model and a scratch copy of the original weights)")
    del sd
    scratch = tempfile.TemporaryDirectory(prefix=scratch_prefix("compress"), dir=out.parent)
    try:
        return _compress_and_save(lm, cfg, plugin, params, fmt, config, out, rep, linear, Path(scratch.name))
    finally:
        scratch.cleanup()


def _compress_and_save(lm, cfg, plugin, params, fmt, config, out, rep, linear, scratch: Path) -> CompressResult:
    jsonl = out / COMPRESS_JSONL
    run = Run("compress", lm.spec, config, cfg.seed)
    sw = Stopwatch(run.timings)
    with disk_full_as_error("a scratch copy of the original weights", cleanup=scratch / "original.safetensors"):
        save_file({k: v.detach().contiguous() for k, v in linear.items()}, str(scratch / "original.safetensors"))
    del linear
    original = LazyTensors(scratch / "original.safetensors")
    keys = list(lm.model.state_dict().keys())
    with sw("calibration_data"):
        calib = calibration_set(lm, cfg) if getattr(plugin, "needs_calibration", True) else None
    t = time.perf_counter()
    with sw("compress"), rep.stage(f"compressing with {plugin.name}", 1) as advance, reporting(rep):
        info = plugin.compress(lm, params, calib) or {}
        advance(1)
    seconds = time.perf_counter() - t
    with sw("save"):
        sd = lm.model.state_dict()
        missing = [k for k in keys if k not in sd]
        if missing:
            raise AirdError(f"compressor {plugin.name} removed weights ({missing[0]}, ...); it must edit them in place.")
        tensors = {k: sd[k] for k in keys}
        writer = (lambda folder: info.update(compressed_format=plugin.save_compressed(lm, folder))) \
            if fmt == "compressed-tensors" else None
        grid = getattr(lm, "quant_grid", None) if fmt == "dense" else None
        extra = None
        if grid:
            from aird.core.qgrid import QUANT_GRID, write_grid

            extra = lambda folder: write_grid(folder, grid["scales"], grid["bits"], grid["strategy"],  # noqa: E731
                                              grid["group_size"])
            info["grid"] = {"file": QUANT_GRID, "bits": grid["bits"], "strategy": grid["strategy"],
                            "group_size": grid["group_size"], "matrices": len(grid["scales"])}
        save_model_folder(lm.model, lm.tokenizer, out, provenance={"compressed_from": lm.path, "method": plugin.name},
                          tensors=tensors, write_weights=writer, extra=extra)
        del tensors, sd
    with sw("measure"):
        # measured from what was written: the safetensors file itself, or the packed folder loaded back
        written = LazyTensors(out / "model.safetensors") if fmt == "dense" else _unpacked_weights(out)
        nm = parse_pattern(params.get("pattern")) if params.get("pattern") else None
        stats = summarize(written, original, group_size=params.get("group_size"), nm=nm, bits=params.get("bits"))
    summary = run.record(
        "compress.summary",
        method=plugin.name,
        kind=getattr(plugin, "kind", None),
        params=params,
        sparsity=stats["sparsity"],
        n_weights=stats["n_weights"],
        bits=stats.get("bits"),
        max_distinct_per_group=stats.get("max_distinct_per_group"),
        nm_compliant=stats.get("nm_compliant"),
        other_sparsity=stats["other_sparsity"],
        per_layer=stats["per_layer"],
        calibration=None if calib is None else {"source": calib.source, "samples": len(calib.input_ids),
                                                "tokens": calib.n_tokens},
        format=fmt,
        info=info,
        seconds=round(seconds, 3),
        peak_rss_mb=round(peak_rss_mb(), 1),
        timings=dict(run.timings),
        out=str(out),
        path=str(out),
    )
    write_jsonl(jsonl, [summary])
    return CompressResult(out, summary)
