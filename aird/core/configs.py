"""The configuration of each step, in one place: the defaults of the subcommands' options (the CLI reads them
from here), of a study file's sections, and of the library's ``run_*`` functions; and each step's checks of its
values, run before any model loads. This module imports nothing heavy (no torch), so the CLI can read it at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from aird.core.errors import AirdError

# the sets the probe reads (the reference splits): left out of every evaluation
SEEN_BY_PROBE = ("harmful_train", "harmful_val", "harmless_train", "harmless_val")
HARMFUL_SETS = ("advbench", "jailbreakbench", "xstest_unsafe")               # eval's default harmful sets (ASR)
BENIGN_SETS = ("jailbreakbench_benign", "xstest_safe", "alpaca")           # eval's default benign sets (over-refusal)
CHECK_SETS = ("jailbreakbench", "xstest_unsafe", "jailbreakbench_benign", "xstest_safe")   # repair's held-out check
GUARD_FROM = ("larger", "original")                           # what repair's over-refusal guard is anchored on
GUARD_ON = ("rate", "score")                                  # what it bounds: the harmless refusal rate, or its mean score
JUDGES = ("generate", "score")                                # how repair's α search judges refusal


def default_engine() -> str:
    """``$AIRD_ENGINE`` when set (the test suite sets ``hf``: tiny models are not worth vLLM's start-up), else
    ``auto``."""
    return os.environ.get("AIRD_ENGINE") or "auto"


def default_scorer() -> str:
    """``$AIRD_SCORER`` when set (the test suite sets ``substring``: tiny models need no judge model), else
    ``classifier``, the judge that agrees best with people (docs/judges.md)."""
    return os.environ.get("AIRD_SCORER") or "classifier"


def _zero_shot_tasks() -> tuple[str, ...]:
    from aird.core.zeroshot import ZERO_SHOT_TASKS

    return ZERO_SHOT_TASKS


@dataclass
class ProbeConfig:
    n_train: int = 128
    n_val: int = 32
    seed: int = 42
    batch_size: int = 16
    method: str = "diff-in-means"
    filter_prompts: bool = True
    layer_cutoff: float = 0.8
    kl_threshold: float = 0.1
    induce_threshold: float = 0.0
    top_k: int = 3                       # best-first: stop once this many candidates pass the filters
    max_scored: int = 30                 # ... or once this many have been scored
    exhaustive: bool = False
    system_prompt: str | None = None     # None: the chat template's own default
    harmful_train: str = "harmful_train"
    harmless_train: str = "harmless_train"
    harmful_val: str = "harmful_val"
    harmless_val: str = "harmless_val"
    data_dir: str | None = None
    device: str | None = None
    dtype: str | None = None             # recorded: results depend on it

    def validate(self) -> None:
        if self.n_train < 2 or self.n_val < 1:
            raise AirdError("--n-train must be at least 2 and --n-val at least 1.")
        if not 0 < self.layer_cutoff <= 1:
            raise AirdError("--layer-cutoff must be in (0, 1].")
        if self.top_k < 1 or self.max_scored < 1:
            raise AirdError("--top-k and --max-scored must be at least 1.")
        if self.batch_size < 1:
            raise AirdError("--batch-size must be at least 1.")


@dataclass
class CompressConfig:
    method: str
    params: dict = field(default_factory=dict)   # only what the user gave; defaults come from the plugin
    calib: str = "harmless"                      # harmless | wikitext
    calib_samples: int = 64
    calib_seq_len: int = 512
    seed: int = 42
    data_dir: str | None = None
    device: str | None = None
    format: str = "auto"                         # auto | dense | compressed-tensors


FIT_POSITIONS = ("all", "post")
LAYER_CHOICES = ("auto", "selective", "gap")   # auto: the repair method's own (its layer_ranking), else selective


@dataclass
class RepairConfig:
    method: str = "aird-ridge"          # the repair that held on held-out sources (docs/generalization.md)
    layer: int | str | None = None      # None: source − 1; int; "selective" (selective writers); "gap" (where compression lost separation); "auto" (the method's own)
    matrix: str = "both"                 # attn | mlp | both
    alpha: float | str = "auto"
    guard: float = 0.02                  # harmless refusal rate may rise at most this much
    guard_from: str = "larger"           # over what: the larger of the original's and the compressed model's rate, or the original's
    guard_on: str = "rate"               # rate (the harmless refusal rate may rise `guard`) | score (its mean score, `guard` × the original's score gap)
    judge: str = "generate"              # generate (as eval judges) | score (first-token refusal score > 0)
    scorer: str = "substring"            # the scorer plugin of the generate judge
    max_new_tokens: int = 24             # the generate judge's answer length (refusal phrases come first)
    candidates: int = 2                  # layer auto / gap: how many of the best-ranked (layer, matrix) / blocks to search
    refine: int = 2                      # generate judge: bisections between the last two grid α
    compressed_probe: str | None = None
    tune_on: list[str] | None = None     # α search prompts: None = the probe's validation splits; else named sets
    tune_limit: int = 32                 # prompts per named tuning set (stratified, seeded)
    fit_on: list[str] | None = None      # fitting repairs: named sets whose prompts join the probe's training prompts in the fit
    fit_limit: int = 64                  # prompts per --fit-on set (stratified, seeded)
    check_on: list[str] = field(default_factory=lambda: list(CHECK_SETS))   # held-out check after the repair
    check_limit: int = 50                # prompts per check set (stratified, seeded); 0 or [] skips the check
    ridge: float | None = None           # fitting repairs: relative ridge; None = chosen by cross-validation
    fit_positions: str = "post"          # fitting repairs: the tokens fitted: the post-instruction ones, or every prompt token
    fit_text: int = 128                  # aird-compensate: plain-text windows (128 tokens of WikiText-2's end) in its calibration
    post_weight: float = 1.0             # aird-compensate*: weight of each prompt's post-instruction tokens in the fit (1: as every token)
    batch_size: int = 16
    data_dir: str | None = None
    device: str | None = None

    def validate(self) -> None:
        """Every option checked before a model loads (a bad one must not cost the user a search first)."""
        import math

        self.matrices()
        if self.judge not in JUDGES:
            raise AirdError(f"--judge must be {' or '.join(JUDGES)}, not {self.judge!r}.")
        if self.alpha != "auto":
            try:
                a = float(self.alpha)
            except (TypeError, ValueError):
                raise AirdError(f"--alpha must be a number or auto, not {self.alpha!r}.") from None
            if not math.isfinite(a) or not a > -1:
                raise AirdError("--alpha must be a finite number greater than -1 (α = -1 removes the direction "
                                "entirely), or auto.")
        for name, value, least in (("--candidates", self.candidates, 1), ("--refine", self.refine, 0),
                                   ("--max-new-tokens", self.max_new_tokens, 1), ("--tune-limit", self.tune_limit, 1),
                                   ("--fit-limit", self.fit_limit, 1),
                                   ("--check-limit", self.check_limit, 0), ("--batch-size", self.batch_size, 1)):
            if not isinstance(value, int) or value < least:
                raise AirdError(f"{name} must be a whole number of at least {least}, not {value!r}.")
        if not 0 <= self.guard < 1:
            raise AirdError(f"--guard must be in [0, 1), not {self.guard!r}.")
        if self.guard_from not in GUARD_FROM:
            raise AirdError(f"--guard-from must be {' or '.join(GUARD_FROM)}, not {self.guard_from!r}.")
        if self.guard_on not in GUARD_ON:
            raise AirdError(f"--guard-on must be {' or '.join(GUARD_ON)}, not {self.guard_on!r}.")
        if self.fit_on:
            from aird.core.plugins import get

            plugin = get("repair", self.method)
            if not (getattr(plugin, "fits", False) or getattr(plugin, "compensates", False)):
                raise AirdError("--fit-on applies to the fitting and compensating repair methods (aird-ridge*, "
                                f"aird-compensate*), not {self.method!r}.")
        if self.fit_text < 0:
            raise AirdError(f"--fit-text must be 0 or more windows, not {self.fit_text}.")
        if not (isinstance(self.post_weight, (int, float)) and math.isfinite(self.post_weight) and self.post_weight > 0):
            raise AirdError(f"--post-weight must be a positive number, not {self.post_weight!r}.")
        if self.post_weight != 1:
            from aird.core.plugins import get

            if not getattr(get("repair", self.method), "compensates", False):
                raise AirdError(f"--post-weight applies to the compensating repairs (aird-compensate*), not "
                                f"{self.method!r}.")
        if self.fit_positions not in FIT_POSITIONS:
            raise AirdError(f"--fit-positions must be {' or '.join(FIT_POSITIONS)}, not {self.fit_positions!r}.")
        if self.ridge is not None and not (math.isfinite(self.ridge) and self.ridge > 0):
            raise AirdError(f"--ridge must be a positive number, not {self.ridge!r}.")
        if isinstance(self.layer, str) and self.layer not in LAYER_CHOICES:
            raise AirdError(f"--layer must be a number, default, {', '.join(LAYER_CHOICES)}, not {self.layer!r}.")
        if isinstance(self.layer, int) and self.layer < 0:
            raise AirdError(f"--layer must be at least 0, not {self.layer}.")

    def matrices(self) -> list[str]:
        if self.matrix not in ("attn", "mlp", "both"):
            raise AirdError(f"--matrix must be attn, mlp or both, not {self.matrix!r}.")
        return ["attn", "mlp"] if self.matrix == "both" else [self.matrix]


@dataclass
class EvalConfig:
    harmful: list[str] = field(default_factory=lambda: list(HARMFUL_SETS))
    benign: list[str] = field(default_factory=lambda: list(BENIGN_SETS))
    jailbreaks: list[str] = field(default_factory=list)   # jbb_gcg, jbb_pair, jbb_aim, jbb_random_search, wild
    wild_templates: int = 5
    prompts_file: str | None = None
    prompts_as: str = "harmful"
    column: str | None = None
    category_column: str | None = None
    limit: int | None = None              # prompts per set (spread over its categories, seeded)
    task_limit: int | None = None         # examples per zero-shot task (None: same as limit)
    alpaca_n: int = 100
    max_new_tokens: int = 64
    scorer: str = field(default_factory=default_scorer)   # the judge whose verdicts make ASR and over-refusal
    judges: list[str] = field(default_factory=list)   # more judges, each verdict recorded beside the scorer's (substring always)
    system_prompt: str | None = None
    seed: int = 42
    selection: str = "stratified"         # how --limit picks prompts (recorded: older runs took the first N)
    tasks: list[str] = field(default_factory=lambda: list(_zero_shot_tasks()))
    ppl_windows: int | None = 40          # WikiText-2 windows evaluated (None: all)
    ppl_ctx_len: int = 1024
    seen: list[str] = field(default_factory=lambda: list(SEEN_BY_PROBE))   # excluded (exact and near duplicates)
    batch_size: int = 16
    data_dir: str | None = None
    device: str | None = None
    engine: str = field(default_factory=default_engine)   # generation engine plugin: auto | hf | vllm | a plugin's
    engine_options: dict = field(default_factory=dict)   # passed to the engine (vLLM: tensor_parallel_size, ...)

    def validate(self, suites: tuple[str, ...] = ("safety", "utility")) -> None:
        """Every option checked before a model loads: a bad value must not surface after an hour of answers."""
        from aird.core.data import JAILBREAKS, SETS
        from aird.core.zeroshot import TASKS

        for name, value, least in (("--limit", self.limit, 1), ("--task-limit", self.task_limit, 1),
                                   ("--alpaca-n", self.alpaca_n, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                   ("--batch-size", self.batch_size, 1), ("--ppl-ctx-len", self.ppl_ctx_len, 16),
                                   ("--ppl-windows", self.ppl_windows, 1), ("--wild-templates", self.wild_templates, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise AirdError(f"{name} must be a whole number of at least {least}, not {value!r}.")
        if self.selection not in ("stratified", "first"):
            raise AirdError(f"--selection must be stratified or first, not {self.selection!r}.")
        if self.prompts_as not in ("harmful", "benign"):
            raise AirdError(f"--as must be harmful or benign, not {self.prompts_as!r}.")
        for role, names, known in (("harmful", self.harmful, SETS), ("benign", self.benign, SETS),
                                   ("jailbreak", self.jailbreaks, JAILBREAKS)):
            for n in names:
                if n not in known:
                    raise AirdError(f"unknown {role} set {n!r}; known: {', '.join(known)} (see `aird data`).")
        if "utility" in suites:
            for t in self.tasks:
                if t not in TASKS:
                    raise AirdError(f"unknown zero-shot task {t!r}; known: {', '.join(TASKS)}.")
        if "safety" in suites and not (self.harmful or self.benign or self.jailbreaks or self.prompts_file):
            raise AirdError("no prompt set to evaluate: name --harmful, --benign, --jailbreak or --prompts.")

    @property
    def tasks_limit(self) -> int | None:
        return self.task_limit if self.task_limit is not None else self.limit
