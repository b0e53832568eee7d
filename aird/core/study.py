"""`aird study`: the paper's whole experiment on one model — compress with a grid, probe every model, diff each
against the original, repair the ones whose direction moved, evaluate everything — and a report.

The study is a pipeline of the five subcommands' core functions; every step writes its usual artifacts under
the study folder, so a rerun after a kill reuses what is finished (each step's summary record is the proof it
finished) and a person can open any step's folder with the ordinary subcommands. Layout:

    OUT/study.json                  the resolved configuration (a rerun must match it, or use --force)
    OUT/steps.jsonl                 one record per finished step, with its wall time
    OUT/original/{probe,eval}/
    OUT/<name>/{model,probe,diff,eval}/            one per compression of the grid
    OUT/<name>-<repair>/{model,probe,diff,eval}/   one per repair of a moved model
    OUT/report.md, OUT/report.html, OUT/plots/

Profiles: ``quick`` (meant to finish on a 2-core CPU in about half an hour on the 0.5B default model: two
compressions, 200 harmful and 200 benign prompts per model, short generations, 50 examples per zero-shot task) and ``full`` (the
paper's grid and the usual sizes). A TOML file (``--config``) overrides any key of the profile.
"""

from __future__ import annotations

import copy
import json
import time
import tomllib
from pathlib import Path
from typing import Callable

from aird.core import plugins
from aird.core.artifacts import Run, append_jsonl, atomic_write_text, read_jsonl, write_jsonl
from aird.core.data import catalogue_status
from aird.core.errors import AirdError, ArtifactError, DataNotFound
from aird.core.progress import Reporter
from aird.core.cards import (DROPPED_WEIGHTS, drop_weights, record_weights, recorded_weights, weights_missing,
                             write_cards)
from aird.core.report import findings, study_judge, write_report
from aird.core.sources import SEEN_BY_PROBE
from aird.core.study_results import Entry, StudyResult
from aird.core.zeroshot import ZERO_SHOT_TASKS

STUDY_JSON = "study.json"
STEPS_JSONL = "steps.jsonl"
REMADE_JSONL = "remade.jsonl"   # models whose weights a resumed study had to make again (see _Study.lm)
DATA_JSONL = "data.jsonl"

_PRUNE = [
    {"name": "wanda-50", "method": "wanda", "params": {"sparsity": 0.5}},
    {"name": "sparsegpt-50", "method": "sparsegpt", "params": {"sparsity": 0.5}},
    {"name": "sparsegpt-2of4", "method": "sparsegpt", "params": {"pattern": "2:4"}},
]
_QUANT = [
    {"name": "rtn-int8", "method": "rtn", "params": {"bits": 8}},
    {"name": "gptq-int4", "method": "gptq", "params": {"bits": 4, "group_size": 128}},
    # AWQ on llm-compressor 0.14 spends minutes per layer on a CPU (see shared notes): full profile on CUDA only
    {"name": "awq-int4", "method": "awq", "params": {"bits": 4, "group_size": 128}, "only_on": "cuda"},
]

_STANDARD_GRID = [
    {"name": "magnitude-50", "method": "magnitude", "params": {"sparsity": 0.5}},
    _PRUNE[0], _PRUNE[1], _PRUNE[2],
    # refusal-preserving compression beside the plain methods at the same sparsity (the original probe is filled
    # in as their reference)
    {"name": "wanda-50-rp", "method": "wanda-rp", "params": {"sparsity": 0.5}},
    {"name": "sparsegpt-50-rp", "method": "sparsegpt-rp", "params": {"sparsity": 0.5}},
    _QUANT[0],
    {"name": "rtn-int4", "method": "rtn", "params": {"bits": 4, "group_size": 128}},
    _QUANT[1],
    {"name": "gptq-int4-rp", "method": "gptq-rp", "params": {"bits": 4, "group_size": 128}},
    {"name": "w8a8", "method": "w8a8", "params": {"bits": 8}},
    _QUANT[2],
]

PROFILES: dict[str, dict] = {
    "quick": {
        "model": "default",
        "seed": 42,
        "grid": [_PRUNE[0], _QUANT[0]],
        "calibration": {"calib": "harmless", "calib_samples": 32, "calib_seq_len": 256},
        "probe": {"n_train": 64, "n_val": 24, "top_k": 1, "max_scored": 5},
        "repair": {"methods": ["aird-ridge"], "when": "moved", "moved_below_cosine": 0.9, "matrix": "both",
                   "alpha": "auto", "layer": "auto", "judge": "generate", "candidates": 1, "max_new_tokens": 16,
                   "check_on": []},   # the study's own evaluation is the held-out check (finding 4)
        # evidence per model (issue: findings with statistical power): at least 200 harmful prompts (JailbreakBench's
        # 88 unseen behaviours and 112 seeded AdvBench goals) and 200 benign ones (JailbreakBench's 97 unseen twins
        # and 112 XSTest safe prompts), 50 examples per zero-shot task; XSTest's unsafe prompts come from a source
        # the repair never tunes on, so finding 4 (judged on held-out sources only) gets 55 + 112 prompts, not 55
        "eval": {"harmful": ["advbench", "jailbreakbench", "xstest_unsafe"],
                 "benign": ["jailbreakbench_benign", "xstest_safe"],
                 "jailbreaks": [], "limit": 112, "task_limit": 50, "max_new_tokens": 32, "ppl_windows": 8,
                 "tasks": list(ZERO_SHOT_TASKS)},
    },
    # the study whose verdicts count (issue: findings with statistical power): every AdvBench prompt,
    # JailbreakBench 100 + 100, XSTest 450, Alpaca 200, the JailbreakBench attack artifacts, 250 examples per
    # zero-shot task, eight compressed models and both repairs of every moved one
    "standard": {
        "model": "default",
        "seed": 42,
        "grid": _STANDARD_GRID,
        "calibration": {"calib": "harmless", "calib_samples": 64, "calib_seq_len": 256},
        "probe": {"n_train": 128, "n_val": 32, "top_k": 2, "max_scored": 20},
        "repair": {"methods": ["aird-ridge", "aird-ridge-sparse"], "when": "moved", "moved_below_cosine": 0.9, "matrix": "both",
                   "alpha": "auto", "layer": "auto", "judge": "generate", "candidates": 1, "max_new_tokens": 16,
                   "check_on": []},
        "eval": {"harmful": ["advbench", "jailbreakbench", "xstest_unsafe"],
                 "benign": ["jailbreakbench_benign", "xstest_safe", "alpaca"],
                 "jailbreaks": ["jbb_gcg", "jbb_pair", "jbb_aim"], "limit": None, "alpaca_n": 200,
                 "task_limit": 250, "max_new_tokens": 32, "ppl_windows": 40,
                 "tasks": list(ZERO_SHOT_TASKS)},
    },
    "full": {
        "model": "default",
        "seed": 42,
        "grid": _PRUNE + _QUANT,
        "calibration": {"calib": "harmless", "calib_samples": 64, "calib_seq_len": 512},
        "probe": {"n_train": 128, "n_val": 32, "top_k": 3, "max_scored": 30},
        "repair": {"methods": ["aird-ridge", "aird-ridge-sparse", "aird"], "when": "moved", "moved_below_cosine": 0.9, "matrix": "both",
                   "alpha": "auto", "layer": "auto", "judge": "generate", "candidates": 2, "max_new_tokens": 24,
                   "check_on": []},
        "eval": {"harmful": ["advbench", "jailbreakbench", "xstest_unsafe"],
                 "benign": ["jailbreakbench_benign", "xstest_safe", "alpaca"],
                 "jailbreaks": ["jbb_gcg", "jbb_pair", "jbb_aim"], "limit": None, "task_limit": 500,
                 "max_new_tokens": 64, "ppl_windows": 40,
                 "tasks": list(ZERO_SHOT_TASKS)},
    },
}
REPAIR_WHEN = ("moved", "all", "never")
# the [repair] keys passed on to RepairConfig as they are
REPAIR_KEYS = ("guard", "guard_from", "guard_on", "judge", "candidates", "max_new_tokens", "tune_on", "tune_limit", "fit_on", "fit_limit", "check_on", "check_limit",
               "ridge", "fit_positions", "fit_text", "post_weight")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


# the keys of each section of a study file: the fields of the subcommand's config it becomes, less what the study
# sets itself (seed, data directory, device), plus the study's own keys
_STUDY_SETS = ("seed", "data_dir", "device")
_REPAIR_OWN = {"methods": list[str], "when": str, "moved_below_cosine": float, "matrix": str, "alpha": "float | str",
               "layer": "int | str | None"}
# a grid entry's own "repairs" replaces [repair] methods for that model (a grid repair for a quantized model, none
# for a refusal-preserving one): the side-by-side comparison of issue "beyond repair"
_GRID_KEYS = {"name": str, "method": str, "params": dict, "only_on": str, "repairs": list[str]}
_TOP = {"model": str, "seed": int, "grid": list, "calibration": dict, "probe": dict, "repair": dict, "eval": dict,
        "keep_models": bool}
# keys a study file may set that no profile sets (their default applies when left out, and a study that leaves
# them out keeps the configuration it had before they existed, so its folder still resumes)
_OPTIONAL_TOP = {"keep_models": True}


def _hints(cls) -> dict:
    import typing

    return typing.get_type_hints(cls)


def _type_ok(value, hint) -> bool:
    """Whether a TOML value fits a field's annotation (int where a float is asked is fine; bool is not an int)."""
    import types
    import typing

    if isinstance(hint, str):
        hint = eval(hint, {"list": list, "dict": dict, "str": str, "int": int, "float": float, "bool": bool})  # noqa: S307
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list or hint is list:
        args = typing.get_args(hint)
        return isinstance(value, list) and (not args or all(_type_ok(v, args[0]) for v in value))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return True


def _type_name(hint) -> str:
    return hint if isinstance(hint, str) else getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def section_keys() -> dict[str, dict]:
    """The keys each section of a study file takes, with their types: the fields of the subcommand's
    configuration it becomes (aird/core/configs.py), less what the study sets itself, plus the study's own."""
    from aird.core.configs import CompressConfig, EvalConfig, ProbeConfig, RepairConfig

    return {
        "calibration": {k: t for k, t in _hints(CompressConfig).items() if k not in _STUDY_SETS + ("method", "params")},
        "probe": {k: t for k, t in _hints(ProbeConfig).items() if k not in _STUDY_SETS + ("dtype",)},
        "repair": {**_REPAIR_OWN, **{k: t for k, t in _hints(RepairConfig).items() if k in REPAIR_KEYS}},
        "eval": {k: t for k, t in _hints(EvalConfig).items() if k not in _STUDY_SETS},
    }


def repair_methods(cfg: dict) -> list[str]:
    """Every repair a study may run: [repair] methods and each grid entry's own ``repairs``, once each."""
    return list(dict.fromkeys(cfg["repair"]["methods"] + [m for g in cfg["grid"] for m in g.get("repairs", [])]))


def check_config(cfg: dict, where: str) -> None:
    """Every key of every section known and of the right type, every grid name a plain folder name, and every
    section's values valid for its subcommand: all before the study's first step, not hours into it."""
    import re

    from aird.core.evaluate import EvalConfig
    from aird.core.probe import ProbeConfig
    from aird.core.repair import RepairConfig

    def check(section: str, values: dict, known: dict) -> None:
        if not isinstance(values, dict):
            raise AirdError(f"{where}: [{section}] must be a table of keys, not {values!r}.")
        for k, v in values.items():
            if k not in known:
                close = [n for n in known if n.replace("_", "") == k.replace("_", "") or n.startswith(k[:3])]
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise AirdError(f"{where}: [{section}] has unknown key {k!r}{hint}; known: {', '.join(sorted(known))}.")
            if not _type_ok(v, known[k]):
                raise AirdError(f"{where}: [{section}] {k} must be {_type_name(known[k])}, not {v!r}.")

    check("study", {k: v for k, v in cfg.items() if k in _TOP}, _TOP)
    for name, known in section_keys().items():
        check(name, cfg[name], known)
    for g in cfg["grid"]:
        if not isinstance(g, dict):
            raise AirdError(f"{where}: every grid entry must be a table (name, method, params), not {g!r}.")
        check("grid entry", g, _GRID_KEYS)
        name = g.get("name") or ""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in ("original", "plots") or ".." in name:
            raise AirdError(f"{where}: grid name {name!r} must be a plain folder name (letters, digits, '.', '_', "
                            "'-'; not 'original' or 'plots').")
    try:
        ProbeConfig(**cfg["probe"]).validate()
        EvalConfig(**cfg["eval"]).validate(("safety", "utility"))
        rc = cfg["repair"]
        for m in repair_methods(cfg):
            RepairConfig(method=m, layer=rc.get("layer"), matrix=rc["matrix"], alpha=rc["alpha"],
                         **{k: rc[k] for k in REPAIR_KEYS if k in rc}).validate()
    except AirdError as exc:
        raise AirdError(f"{where}: {exc}") from None


def resolve_config(profile: str = "quick", config_file: Path | None = None, overrides: dict | None = None,
                   cuda: bool = False) -> dict:
    """The study configuration: a profile, a TOML file over it, then command-line overrides; checked."""
    if profile not in PROFILES:
        raise AirdError(f"unknown profile {profile!r}; use {' or '.join(PROFILES)}.")
    cfg = copy.deepcopy(PROFILES[profile])
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise AirdError(f"study config {path} not found.")
        try:
            user = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise AirdError(f"study config {path} is not valid TOML: {exc}.") from None
        unknown = sorted(set(user) - set(cfg) - set(_OPTIONAL_TOP))
        if unknown:
            raise AirdError(f"study config {path} has unknown key {unknown[0]!r}; known: {', '.join(sorted(cfg))}.")
        cfg = _merge(cfg, user)
    cfg = _merge(cfg, {k: v for k, v in (overrides or {}).items() if v is not None})
    check_config(cfg, str(config_file) if config_file is not None else "the study configuration")
    cfg["profile"] = profile
    skipped = [g for g in cfg["grid"] if g.get("only_on") == "cuda" and not cuda]
    cfg["grid"] = [g for g in cfg["grid"] if g not in skipped]
    cfg["skipped"] = [{"name": g["name"], "why": "CPU only: this method takes hours here (run on CUDA)"} for g in skipped]
    names = [g.get("name") for g in cfg["grid"]]
    for g in cfg["grid"]:
        if not g.get("name") or not g.get("method"):
            raise AirdError("every grid entry of the study needs a name and a method.")
        plugins.get("compressor", g["method"])
    if len(set(names)) != len(names):
        raise AirdError("the names of the study's grid entries must be distinct.")
    for m in repair_methods(cfg):
        plugins.get("repair", m)
    if cfg["eval"].get("engine", "auto") != "auto":
        plugins.get("engine", cfg["eval"]["engine"])
    if cfg["repair"]["when"] not in REPAIR_WHEN:
        raise AirdError(f"repair.when must be one of {', '.join(REPAIR_WHEN)}.")
    return cfg


def _has_weights(model_path: str) -> bool:
    """Whether a study model's weights are here: not for a model folder whose weights ``--drop-models`` removed
    or that was copied without them (the original, named by a spec or a path, always is)."""
    p = Path(model_path)
    return not p.is_dir() or not weights_missing(p)


def _summary(path: Path, record: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        recs = read_jsonl(path, torn_tail_ok=True)
    except ArtifactError:
        return None
    return next((r for r in recs if r["record"] == record), None)


class _NotFinished(Exception):
    """A step the study has not finished, met while only finished steps may be read (``report_study``)."""


class _Study:
    def __init__(self, cfg: dict, out: Path, rep: Reporter, device: str | None, data_dir: str | None,
                 advance: Callable[..., None], trust_remote_code: bool = False, finished_only: bool = False):
        self.cfg, self.out, self.rep, self.device, self.data_dir = cfg, out, rep, device, data_dir
        self.trust_remote_code = trust_remote_code
        self.finished_only = finished_only     # read what steps.jsonl says is done; run and load nothing
        self.advance = advance
        self.steps: list[dict] = []
        self.done = {r["step"]: r for r in (read_jsonl(out / STEPS_JSONL, torn_tail_ok=True)
                                            if (out / STEPS_JSONL).exists() else [])}
        self._lm = None
        self._lm_path: str | None = None
        self._makers: dict[str, Callable[[], None]] = {}   # model folder -> how to write it again

    # one model in memory at a time; a step that is already finished does not load it
    def lm(self, path: str):
        from aird.core.loading import load_model

        if self.finished_only:
            raise _NotFinished(path)
        if self._lm is None or self._lm_path != path:
            self._lm = None
            if path in self._makers and weights_missing(path):
                self._remake(path)
            self._lm = load_model(path, device=self.device, trust_remote_code=self.trust_remote_code)
            self._lm_path = path
        return self._lm

    def _remake(self, path: str) -> bool | None:
        """Write a study model's folder again when a step still needs it and its weights are not here: dropped,
        or left out of a copy of the study (a study resumed on another machine gets the records, not the
        weights). The compression or repair runs again with the same configuration and seed; the new weights'
        digests are compared with the ones kept when the model was first made, and ``remade.jsonl`` says whether
        they are identical (bit for bit on the same machine; another CPU may round differently). Returns that
        (None when no digests were kept)."""
        expected = recorded_weights(path)
        self.rep.note(f"study: the weights of {path} are not here; making them again")
        t = time.perf_counter()
        self._makers[path]()
        got = record_weights(path)
        rec = {"record": "study.remade", "model": path, "seconds": round(time.perf_counter() - t, 3),
               "identical": None if expected is None else got == expected, "expected_sha256": expected,
               "sha256": got, "finished": time.time()}
        append_jsonl(self.out / REMADE_JSONL, [rec])
        if rec["identical"] is False:
            self.rep.note(f"study: the remade weights of {path} differ from the first ones (remade.jsonl)")
        return rec["identical"]

    def forget(self) -> None:
        import gc

        self._lm, self._lm_path = None, None
        gc.collect()   # a model with hooks sits in reference cycles: free it before the next one loads

    def step(self, name: str, fn: Callable[[], dict]) -> dict:
        if self.finished_only and name not in self.done:
            raise _NotFinished(name)
        self.advance(0, description=f"study: {name}")
        t = time.perf_counter()
        res = fn()
        seconds = round(time.perf_counter() - t, 3)
        resumed = bool(res.get("resumed"))
        rec = self.done.get(name) if resumed and name in self.done else {
            "record": "study.step", "step": name, "seconds": seconds, "resumed": resumed, "finished": time.time()}
        if name not in self.done:
            append_jsonl(self.out / STEPS_JSONL, [rec])
            self.done[name] = rec
        self.steps.append(rec)
        self.advance(1)
        return res

    # ---- the five subcommands ---------------------------------------------------------------------------
    def probe(self, e: Entry) -> dict:
        from aird.core.probe import PROBE_JSONL, ProbeConfig, run_probe

        def go() -> dict:
            done = _summary(e.folder / "probe" / PROBE_JSONL, "probe.summary")
            if done is not None and ("mediation" in done or not _has_weights(e.model_path)):
                return {**done, "resumed": True}
            # (a probe finished before aird recorded mediation gets it now: run_probe adds it on resume)
            lm = self.lm(e.model_path)
            pc = ProbeConfig(seed=self.cfg["seed"], data_dir=self.data_dir, device=self.device,
                             **self.cfg["probe"])
            pc.dtype = lm.info["dtype"]
            res = run_probe(lm, pc, e.folder / "probe", reporter=self.rep)
            return {**res.summary, "resumed": True} if res.resumed else res.summary

        e.probe = self.step(f"probe {e.name}", go)
        return e.probe

    def diff(self, e: Entry, original: Entry) -> dict:
        from aird.core.diff import DIFF_JSONL, run_diff

        def go() -> dict:
            done = _summary(e.folder / "diff" / DIFF_JSONL, "diff.summary")
            if done is not None:
                return {**done, "resumed": True}
            return run_diff(original.folder / "probe", e.folder / "probe", e.folder / "diff",
                            lm=self.lm(e.model_path), reporter=self.rep)

        e.diff = self.step(f"diff {e.name}", go)
        return e.diff

    def evaluate(self, e: Entry) -> dict:
        from aird.core.evaluate import EVAL_JSONL, EvalConfig, run_eval

        def go() -> dict:
            done = _summary(e.eval_dir / EVAL_JSONL, "eval.summary")
            if done is not None:
                return {**done, "resumed": True}
            ev = dict(self.cfg["eval"])
            # what the probe and every repair of the study tuned on stays out of every model's evaluation
            ev.setdefault("seen", list(dict.fromkeys([*SEEN_BY_PROBE, *(self.cfg["repair"].get("tune_on") or [])])))
            ec = EvalConfig(seed=self.cfg["seed"], data_dir=self.data_dir, device=self.device, **ev)
            return run_eval(self.lm(e.model_path), ec, e.eval_dir, ("safety", "utility"), reporter=self.rep)

        e.eval = self.step(f"eval {e.name}", go)
        return e.eval

    def compress(self, g: dict, original: Entry) -> Entry:
        from aird.core.compress import COMPRESS_JSONL, CompressConfig, run_compress, takes_reference

        folder = self.out / g["name"]
        model_dir = folder / "model"

        def make(force: bool = False) -> dict:
            self.forget()   # the compressor edits the loaded model in place: load a fresh copy
            lm = self.lm(original.model_path)
            params = dict(g.get("params", {}))
            # a refusal-preserving compressor (wanda-rp, …) protects the study's own original direction
            if takes_reference(g["method"]) and not params.get("reference"):
                params["reference"] = str(original.folder / "probe")
            cc = CompressConfig(method=g["method"], params=params, seed=self.cfg["seed"],
                                data_dir=self.data_dir, device=self.device, **self.cfg["calibration"])
            res = run_compress(lm, cc, model_dir, force=force, reporter=self.rep)
            self.forget()
            return res.summary

        s = self._model_step(f"compress {g['name']}", model_dir, COMPRESS_JSONL, "compress.summary", make,
                             lambda: [g["name"], *(f"{g['name']}-{m}"
                                                   for m in g.get("repairs", self.cfg["repair"]["methods"]))])
        return Entry(g["name"], "compressed", folder, str(model_dir), method=s["method"], kind=s.get("kind"),
                     compress=s)

    def _model_step(self, step: str, model_dir: Path, jsonl: str, record: str, make: Callable[..., dict],
                    models: Callable[[], list[str]]) -> dict:
        """A step that writes a model folder (compress, repair): reused when its summary record is there, else
        made (its weights' digests kept beside them); registered to be made again when a later step needs its
        weights and they are not here, and checked for that at once (:meth:`_refresh`)."""
        def go() -> dict:
            done = _summary(model_dir / jsonl, record)
            if done is not None and (model_dir / "config.json").is_file():
                return {**done, "resumed": True}
            s = make()
            record_weights(model_dir)
            return s

        self._makers[str(model_dir)] = lambda: make(force=True)
        s = self.step(step, go)
        self._refresh(model_dir, models, keep={step})
        return s

    def _refresh(self, model_dir: Path, models: Callable[[], list[str]], keep: set[str]) -> None:
        """Right after a model's compress or repair step: if the study stopped part-way through that model's block
        (weights are dropped only once every step of a block is done) on a machine whose weights did not come
        along, make them before the block's next step; if they are not the ones the block's finished steps saw,
        those steps (of ``models()``: the model and the models made from it) run again on the new ones."""
        if self.finished_only or not weights_missing(model_dir) or (model_dir / DROPPED_WEIGHTS).is_file():
            return
        if self._remake(str(model_dir)) is False:
            self._forget_steps(models(), keep)

    def _forget_steps(self, models: list[str], keep: set[str]) -> None:
        """Undo the finished steps of these models (but ``keep``): their records leave steps.jsonl and their
        artifacts go (a repaired model's whole folder), so the study runs them again."""
        import shutil

        gone = [n for n, r in self.done.items() if n not in keep and n.split(" ", 1)[1] in models]
        for n in gone:
            del self.done[n]
        write_jsonl(self.out / STEPS_JSONL, list(self.done.values()))
        for i, name in enumerate(models):
            for sub in (("probe", "diff", "eval") if i == 0 else ("",)):
                shutil.rmtree(self.out / name / sub, ignore_errors=True)
        self.rep.note(f"study: {len(gone)} finished steps of {', '.join(models)} run again on the remade weights")

    def repair(self, method: str, parent: Entry, original: Entry) -> Entry:
        from aird.core.repair import REPAIR_JSONL, RepairConfig, run_repair

        name = f"{parent.name}-{method}"
        folder = self.out / name
        model_dir = folder / "model"
        rc = self.cfg["repair"]

        def make(force: bool = False) -> dict:
            self.forget()   # the edit is applied to the loaded model
            cfg = RepairConfig(method=method, layer=rc.get("layer"), matrix=rc["matrix"], alpha=rc["alpha"],
                               compressed_probe=str(parent.folder / "probe"), data_dir=self.data_dir,
                               device=self.device, **{k: rc[k] for k in REPAIR_KEYS if k in rc})
            s = run_repair(self.lm(parent.model_path), original.folder / "probe", cfg, model_dir, force=force,
                           reporter=self.rep)
            self.forget()
            return s

        s = self._model_step(f"repair {name}", model_dir, REPAIR_JSONL, "repair.summary", make, lambda: [name])
        return Entry(name, "repaired", folder, str(model_dir), parent=parent.name, method=method, kind="repair",
                     repair=s)


def moved(diff: dict, threshold: float) -> bool:
    """Did compression move the refusal direction: its source changed, or its cosine to the original's chosen
    direction fell below the threshold."""
    return bool(diff["source"]["moved"]) or diff["cosine_chosen"] < threshold


def repairs_due(diff: dict, rc: dict) -> bool:
    """Whether the study repairs a compressed model with this diff, under its [repair] settings ``rc``."""
    return rc["when"] == "all" or (rc["when"] == "moved" and moved(diff, rc["moved_below_cosine"]))


def n_steps(cfg: dict) -> int:
    """Steps of a study when every compressed model gets repaired (the progress bar's upper bound)."""
    g = len(cfg["grid"])
    reps = 0 if cfg["repair"]["when"] == "never" else \
        sum(len(e.get("repairs", cfg["repair"]["methods"])) for e in cfg["grid"])
    return 2 + 4 * g + 4 * reps


def data_used(cfg: dict) -> list[str]:
    """The data catalogue entries a study configuration reads: the probe's and the repair's reference splits,
    the calibration set, every evaluation set, jailbreak and zero-shot task, and WikiText-2 (perplexity)."""
    names = ["harmful_train", "harmful_val", "harmless_train", "harmless_val",
             "harmless_test" if cfg["calibration"]["calib"] == "harmless" else "wikitext2"]
    ev = cfg["eval"]
    names += [*ev["harmful"], *ev["benign"], *ev["jailbreaks"]]
    if "wild" in ev["jailbreaks"]:
        names.append("jailbreakbench")   # the goals the templates are filled with
    names += [*ev["tasks"], "wikitext2"]
    return list(dict.fromkeys(names))


def report_study(out: Path) -> StudyResult:
    """The report of what a study has finished so far, with its own stored configuration: every model whose
    steps are all in steps.jsonl, read from its artifacts, with its card; nothing is run, no model is loaded and no
    lock is taken, so it can be written while the study runs (report.md says which models are still to come)."""
    out = Path(out)
    stored = out / STUDY_JSON
    if not stored.is_file():
        raise ArtifactError(f"{out} holds no study ({STUDY_JSON} is missing); start it with `aird study --out {out}`.")
    try:
        cfg = json.loads(stored.read_text())["config"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ArtifactError(f"{stored} is not a study configuration aird wrote.") from None
    t0 = time.perf_counter()
    st = _Study(cfg, out, Reporter(), None, None, lambda *a, **k: None, finished_only=True)
    original = Entry("original", "original", out / "original", cfg["model"])
    try:
        st.probe(original)
        st.evaluate(original)
    except _NotFinished:
        raise ArtifactError(f"the study in {out} has not finished the original model's probe and evaluation yet: "
                            "nothing to report.") from None
    compressed: list[Entry] = []
    repaired: list[Entry] = []
    pending: list[str] = []
    rc = cfg["repair"]
    for g in cfg["grid"]:
        methods = list(g.get("repairs", rc["methods"]))
        try:
            e = st.compress(g, original)
            st.probe(e)
            st.diff(e, original)
            st.evaluate(e)
        except _NotFinished:
            pending.append(g["name"])     # (its repairs follow if its direction moves: not known yet)
            continue
        compressed.append(e)
        if not repairs_due(e.diff, rc):
            continue
        for method in methods:
            try:
                r = st.repair(method, e, original)
                st.probe(r)
                st.diff(r, original)
                st.evaluate(r)
            except _NotFinished:
                pending.append(f"{g['name']}-{method}")
                continue
            repaired.append(r)
    entries = [original, *compressed, *repaired]
    found = findings(entries, cfg)
    write_cards(entries, study_judge(cfg, entries))     # the finished models' cards (hashes their weights once)
    report = write_report(out, cfg, entries, st.steps, found, pending=pending)
    return StudyResult(out, cfg, entries, st.steps, report, found, round(time.perf_counter() - t0, 3), pending)


def run_study(cfg: dict, out: Path, force: bool = False, reporter: Reporter | None = None,
              device: str | None = None, data_dir: str | None = None, trust_remote_code: bool = False) -> StudyResult:
    """See _run_study; one run at a time per output folder (a second one fails at once)."""
    from aird.core.reliability import out_lock

    with out_lock(Path(out), beside=True):   # beside: a study of a missing model writes nothing
        return _run_study(cfg=cfg, out=out, force=force, reporter=reporter, device=device, data_dir=data_dir,
                          trust_remote_code=trust_remote_code)


def _run_study(cfg: dict, out: Path, force: bool = False, reporter: Reporter | None = None,
               device: str | None = None, data_dir: str | None = None, trust_remote_code: bool = False) -> StudyResult:
    from aird.core.loading import resolve_model_path

    rep = reporter or Reporter()
    resolve_model_path(cfg["model"])   # a missing model fails here, before anything is written
    out = Path(out)
    if out.is_file():
        raise ArtifactError(f"{out} is a file; the study needs a folder.")
    out.mkdir(parents=True, exist_ok=True)
    stored = out / STUDY_JSON
    semantic = cfg
    if stored.exists() and not force:
        old = json.loads(stored.read_text())
        if old.get("config") != semantic:
            diff = sorted(k for k in set(old.get("config", {})) | set(semantic)
                          if old.get("config", {}).get(k) != semantic.get(k))
            raise ArtifactError(f"{out} holds a study with other settings ({', '.join(diff)}); use another --out "
                                "or --force to start it again.")
    if force:
        import shutil

        for child in out.iterdir():
            if child.is_dir() and (child.name == "original" or child.name == "plots"
                                   or (child / "model").is_dir() or (child / "probe").is_dir()):
                shutil.rmtree(child)
            elif child.name in (STEPS_JSONL, "report.md", "report.html"):
                child.unlink()
    run = Run("study", cfg["model"], semantic, cfg["seed"])
    atomic_write_text(stored, json.dumps(run.record("study.config"), indent=1, default=str) + "\n")
    used = set(data_used(cfg))
    data = [{"record": "study.data", **r} for r in catalogue_status(data_dir) if r["name"] in used]
    missing = [r["name"] for r in data if r["found"] == "missing"]
    if missing:
        raise DataNotFound(f"the study needs data set {missing[0]!r}, found neither in the data directory nor in "
                           "the copy bundled with aird (see `aird data`).")
    write_jsonl(out / DATA_JSONL, data)
    t0 = time.perf_counter()
    entries: list[Entry] = []
    with rep.stage("study", n_steps(cfg)) as advance:
        st = _Study(cfg, out, rep, device, data_dir, advance, trust_remote_code)
        original = Entry("original", "original", out / "original", cfg["model"])
        entries.append(original)
        st.probe(original)
        st.evaluate(original)
        compressed, repaired = [], []
        rc = cfg["repair"]
        keep = cfg.get("keep_models", _OPTIONAL_TOP["keep_models"])
        # each compressed model is repaired right after its own evaluation, so that with keep_models = false its
        # weights (and its repairs') can go before the next model is made: one model's folders on disk at a time
        for g in cfg["grid"]:
            e = st.compress(g, original)
            compressed.append(e)
            st.probe(e)
            st.diff(e, original)
            st.evaluate(e)
            todo = repairs_due(e.diff, rc)
            mine = []
            for method in g.get("repairs", rc["methods"]):
                if not todo:
                    advance(4)
                    continue
                r = st.repair(method, e, original)
                mine.append(r)
                st.probe(r)
                st.diff(r, original)
                st.evaluate(r)
            repaired += mine
            if not keep:
                st.forget()
                for m in [e, *mine]:
                    drop_weights(m.model_path)
        entries += compressed + repaired
        st.forget()
        advance(0, description="study: report")
        found = findings(entries, cfg)
        write_cards(entries, study_judge(cfg, entries))
        report = write_report(out, cfg, entries, st.steps, found)
    return StudyResult(out, cfg, entries, st.steps, report, found, round(time.perf_counter() - t0, 3))
