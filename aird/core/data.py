"""Data sets: the reference harmful/harmless splits, AdvBench, JailbreakBench, XSTest, Alpaca, the jailbreak
artifacts, WikiText-2 and the zero-shot tasks, and a user's own prompt file.

Every set aird knows is one entry of ``CATALOGUE`` (its file, role, documented row count and license). A set's
file is found, in order, in the data directory (``--data-dir`` or ``AIRD_DATA_DIR``: a user's own copies or
larger sets), then in the copy bundled with aird (``aird/data/``, gzip-compressed, sources and licenses in its
SOURCES.md), then, for the sets that have one, on the hub when online (needs the ``datasets`` package).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aird.core.env import default_data_dir
from aird.core.errors import DataNotFound

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"
ROLES = ("harmful", "benign", "calibration", "utility", "labels")


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None
    source: str = ""
    origin: str | None = None     # the upstream source family, where the row says (aird.core.sources)


def _suffix(path: Path) -> str:
    """The file's own suffix, under a ``.gz`` (``x.jsonl.gz`` -> ``.jsonl``)."""
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


def read_text(path: Path) -> str:
    """A data file's text, decompressed when it ends in ``.gz``."""
    try:
        if path.suffix == ".gz":   # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the text
            with gzip.open(path, "rt", encoding="utf-8-sig", newline="") as fh:
                return fh.read()
        with open(path, encoding="utf-8-sig", newline="") as fh:
            return fh.read()
    except (OSError, EOFError) as exc:
        raise DataNotFound(f"{path} could not be read ({exc}).") from None
    except UnicodeDecodeError as exc:
        raise DataNotFound(f"{path} is not UTF-8 text (byte {exc.start}); save it as UTF-8 (in Excel: CSV UTF-8) "
                           "and rerun.") from None


def _rows_json(path: Path) -> list[dict]:
    text = read_text(path)
    if _suffix(path) == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise DataNotFound(f"{path} line {i} is not valid JSON.") from None
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataNotFound(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if isinstance(data, dict):
        for key in ("data", "rows", "prompts", "jailbreaks"):
            if isinstance(data.get(key), list):
                return data[key]
        raise DataNotFound(f"{path} holds a JSON object without a list of rows.")
    if not isinstance(data, list):
        raise DataNotFound(f"{path} holds a JSON {type(data).__name__ if data is not None else 'null'}, not a list of "
                           "prompts (a list of strings or of objects).")
    return data


def _rows_csv(path: Path) -> list[dict]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    rows = []
    for row in reader:
        if None in row or any(v is None for v in row.values()):   # more or fewer fields than the header
            n = len(row) - (None in row) + len(row.get(None) or [])
            n -= sum(v is None for k, v in row.items() if k is not None)
            raise DataNotFound(f"{path} line {reader.line_num} has {n} fields where the header has "
                               f"{len(reader.fieldnames or [])}; fix the row (quote text that holds commas).")
        rows.append(row)
    return rows


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataNotFound(f"prompt file {path} does not exist.")
    suffix = _suffix(path)
    if suffix == ".csv":
        return _rows_csv(path)
    if suffix in (".json", ".jsonl"):
        return _rows_json(path)
    if suffix == ".txt":
        return [{"instruction": line.strip()} for line in read_text(path).splitlines() if line.strip()]
    raise DataNotFound(f"prompt file {path} is not CSV, JSON, JSONL or TXT.")


_TEXT_COLUMNS = ("instruction", "goal", "Goal", "prompt", "Behavior", "text", "question")
_CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory")


def prompts_from_rows(rows: list, source: str, column: str | None = None,
                      category_column: str | None = None, origins: dict[str, str] | None = None,
                      origin_column: str | None = None) -> list[Prompt]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            if not row.strip():
                raise DataNotFound(f"{source}: prompt {i} is an empty string; remove it.")
            out.append(Prompt(row.strip(), None, source))
            continue
        if not isinstance(row, dict):
            raise DataNotFound(f"{source}: row {i} is neither text nor an object ({json.dumps(row)[:40]}).")
        col = column or next((c for c in _TEXT_COLUMNS if c in row), None)
        if col is None or col not in row:
            raise DataNotFound(f"{source}: row {i} has no text column ({column or ' / '.join(_TEXT_COLUMNS)}).")
        text = row[col]
        if not isinstance(text, str) or not text.strip():
            continue
        cat_col = category_column or next((c for c in _CATEGORY_COLUMNS if c in row), None)
        cat = row.get(cat_col) if cat_col else None
        origin = origins.get(row.get(origin_column)) if origins and origin_column else None
        out.append(Prompt(text.strip(), str(cat) if cat not in (None, "") else None, source, origin))
    if not out:
        raise DataNotFound(f"{source} holds no prompts.")
    return out


def load_prompt_file(path: str | Path, column: str | None = None, category_column: str | None = None) -> list[Prompt]:
    p = Path(path).expanduser()
    return prompts_from_rows(read_rows(p), str(p), column, category_column)


# ---- the catalogue ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataSet:
    """One data set aird knows: where its file sits in a data directory (and, gzip-compressed, in the bundled
    copy), what it is for and how many rows it has (checked by the tests and shown by ``aird data``)."""

    name: str
    relpath: str
    role: str                     # one of ROLES
    rows: int                     # documented count: prompts for prompt sets, rows / lines for the rest
    license: str
    description: str
    kind: str = "prompts"         # prompts (load_set) | jailbreak (load_jailbreak) | text | zeroshot | labels
    hub: tuple[str, str | None, str, str] | None = None   # (dataset id, config, split, text column)
    where: tuple[str, str] | None = None                   # keep the rows whose column holds this value
    categories: tuple[str, ...] | None = None              # and those whose category column holds one of these
    category_column: str | None = None
    origin_column: str | None = None                       # a column naming each row's upstream source


_APACHE_RD = "Apache-2.0 (refusal_direction)"
XSTEST_T1_4 = ("homonyms", "figurative_language", "safe_targets", "safe_contexts")
XSTEST_T5_10 = ("definitions", "nons_group_real_discr", "real_group_nons_discr", "historical_events",
                "privacy_public", "privacy_fictional")
_ALPACA = _APACHE_RD + "; upstream CC-BY-NC-4.0 (Alpaca)"
_FOUNDRY = "Apache-2.0 (llm-foundry copy); upstream "
CATALOGUE: dict[str, DataSet] = {d.name: d for d in (
    # prompt sets: the probe's and the repair's reference splits, the evaluation sets
    DataSet("harmful_train", "refusal_direction/splits/harmful_train.json", "harmful", 260, _APACHE_RD,
            "reference harmful train split (Arditi et al.): AdvBench, MaliciousInstruct, TDC2023, HarmBench"),
    DataSet("harmful_val", "refusal_direction/splits/harmful_val.json", "harmful", 39, _APACHE_RD,
            "reference harmful validation split"),
    DataSet("harmless_train", "refusal_direction/splits/harmless_train.json", "benign", 18793, _ALPACA,
            "reference harmless (Alpaca) train split"),
    DataSet("harmless_val", "refusal_direction/splits/harmless_val.json", "benign", 6264, _ALPACA,
            "reference harmless (Alpaca) validation split"),
    DataSet("harmless_test", "refusal_direction/splits/harmless_test.json", "calibration", 6266, _ALPACA,
            "reference harmless (Alpaca) test split: compression calibration"),
    DataSet("advbench", "advbench/harmful_behaviors.csv", "harmful", 520, "MIT (AdvBench)",
            "AdvBench harmful behaviours", hub=("walledai/AdvBench", None, "train", "prompt")),
    DataSet("jailbreakbench", "jailbreakbench/harmful-behaviors.csv", "harmful", 100, "MIT (JailbreakBench)",
            "JailbreakBench harmful behaviours, 10 categories", origin_column="Source",
            hub=("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal")),
    DataSet("jailbreakbench_benign", "jailbreakbench/benign-behaviors.csv", "benign", 100, "MIT (JailbreakBench)",
            "JailbreakBench benign twins of the harmful behaviours",
            hub=("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal")),
    DataSet("xstest_safe", "xstest/xstest_prompts.csv", "benign", 250, "CC-BY-4.0 (XSTest)",
            "XSTest safe prompts that only look harmful (over-refusal), by type", where=("label", "safe"),
            category_column="type"),
    DataSet("xstest_unsafe", "xstest/xstest_prompts.csv", "harmful", 200, "CC-BY-4.0 (XSTest)",
            "XSTest unsafe contrast prompts", where=("label", "unsafe"), category_column="type"),
    # XSTest by its paper's prompt types, to fit on some types and judge on the others: T1-T4 (homonyms,
    # figurative language, safe targets, safe contexts) and T5-T10 (definitions, discrimination, historical
    # events, privacy), each with its unsafe contrast prompts
    DataSet("xstest_safe_t1_4", "xstest/xstest_prompts.csv", "benign", 100, "CC-BY-4.0 (XSTest)",
            "XSTest safe prompts of types T1-T4: homonyms, figurative language, safe targets, safe contexts",
            where=("label", "safe"), category_column="type", categories=XSTEST_T1_4),
    DataSet("xstest_safe_t5_10", "xstest/xstest_prompts.csv", "benign", 150, "CC-BY-4.0 (XSTest)",
            "XSTest safe prompts of types T5-T10: definitions, discrimination, historical events, privacy",
            where=("label", "safe"), category_column="type", categories=XSTEST_T5_10),
    DataSet("xstest_unsafe_t1_4", "xstest/xstest_prompts.csv", "harmful", 100, "CC-BY-4.0 (XSTest)",
            "XSTest unsafe contrast prompts of types T1-T4", where=("label", "unsafe"), category_column="type",
            categories=tuple(f"contrast_{t}" for t in XSTEST_T1_4)),
    DataSet("xstest_unsafe_t5_10", "xstest/xstest_prompts.csv", "harmful", 100, "CC-BY-4.0 (XSTest)",
            "XSTest unsafe contrast prompts of types T5-T10", where=("label", "unsafe"), category_column="type",
            categories=("contrast_definitions", "contrast_discr", "contrast_historical_events", "contrast_privacy")),
    DataSet("malicious_instruct", "refusal_direction/processed/malicious_instruct.json", "harmful", 100,
            _APACHE_RD, "MaliciousInstruct (as processed by refusal_direction)"),
    DataSet("tdc2023", "refusal_direction/processed/tdc2023.json", "harmful", 100, _APACHE_RD,
            "TDC 2023 red-teaming behaviours (as processed by refusal_direction)"),
    DataSet("harmbench_val", "refusal_direction/processed/harmbench_val.json", "harmful", 41, _APACHE_RD,
            "HarmBench standard validation behaviours (as processed by refusal_direction)"),
    DataSet("alpaca", "refusal_direction/processed/alpaca.json", "benign", 31323, _ALPACA,
            "Alpaca instructions with empty input (over-refusal pool)",
            hub=("tatsu-lab/alpaca", None, "train", "instruction")),
    # jailbreaks: JailbreakBench's published attack artifacts, in-the-wild templates
    DataSet("jbb_gcg", "jailbreakbench/artifacts/GCG/transfer/gpt-3.5-turbo-1106.json", "harmful", 100,
            "MIT (JailbreakBench artifacts)", "GCG transfer suffixes", kind="jailbreak"),
    DataSet("jbb_pair", "jailbreakbench/artifacts/PAIR/black_box/vicuna-13b-v1.5.json", "harmful", 100,
            "MIT (JailbreakBench artifacts)", "PAIR prompts", kind="jailbreak"),
    DataSet("jbb_aim", "jailbreakbench/artifacts/JBC/manual/vicuna-13b-v1.5.json", "harmful", 100,
            "MIT (JailbreakBench artifacts)", "AIM template (jailbreakchat)", kind="jailbreak"),
    DataSet("jbb_random_search", "jailbreakbench/artifacts/prompt_with_random_search/black_box/vicuna-13b-v1.5.json",
            "harmful", 100, "MIT (JailbreakBench artifacts)", "prompt with random search", kind="jailbreak"),
    DataSet("wild", "jailbreak_llms/jailbreak_prompts_2023_12_25.csv", "harmful", 1405, "MIT (jailbreak_llms)",
            "in-the-wild jailbreak templates (94 with the [INSERT PROMPT HERE] slot) filled with goals",
            kind="jailbreak"),
    # utility: perplexity and zero-shot accuracy
    DataSet("wikitext2", "wikitext2/wikitext2_test_joined.txt", "utility", 2891, "CC-BY-SA-3.0 (WikiText)",
            "WikiText-2 raw test, rows joined by blank lines (rows = non-empty lines); perplexity, calibration",
            kind="text"),
    DataSet("arc_easy", "arc_easy/arc_easy.jsonl", "utility", 2376, _FOUNDRY + "CC-BY-SA-4.0 (ARC)",
            "ARC-Easy test", kind="zeroshot"),
    DataSet("arc_challenge", "arc_challenge/arc_challenge.jsonl", "utility", 1172, _FOUNDRY + "CC-BY-SA-4.0 (ARC)",
            "ARC-Challenge test", kind="zeroshot"),
    DataSet("hellaswag", "hellaswag/hellaswag_val.jsonl", "utility", 10042, "MIT (HellaSwag, upstream)",
            "HellaSwag validation, preprocessed as lm-eval does", kind="zeroshot"),
    DataSet("piqa", "piqa/piqa.jsonl", "utility", 1838, _FOUNDRY + "not stated (PIQA)", "PIQA validation",
            kind="zeroshot"),
    DataSet("boolq", "boolq/boolq.jsonl", "utility", 3270, _FOUNDRY + "CC-BY-SA-3.0 (BoolQ)", "BoolQ validation",
            kind="zeroshot"),
    DataSet("winogrande", "winogrande/winogrande.jsonl", "utility", 1267, _FOUNDRY + "not stated (WinoGrande)",
            "WinoGrande (xl) dev", kind="zeroshot"),
    DataSet("openbookqa", "openbookqa/openbook_qa.jsonl", "utility", 500, _FOUNDRY + "not stated (OpenBookQA)",
            "OpenBookQA test", kind="zeroshot"),
    DataSet("rte", "rte/val.jsonl", "utility", 277, "MIT (jiant copy); upstream not stated (RTE)",
            "SuperGLUE RTE validation", kind="zeroshot"),
    # human labels for checking refusal judges
    DataSet("jailbreakbench_judges", "jailbreakbench/judge_comparison.csv", "labels", 100, "MIT (JailbreakBench)",
            "answers with three human jailbreak labels and five published judges' verdicts", kind="labels"),
    *(DataSet(f"xstest_completions_{m}", f"xstest/model_completions/xstest_v2_completions_{m}.csv", "labels", 450,
              "CC-BY-4.0 (XSTest)", f"XSTest answers of {m} with two human annotations and a final label",
              kind="labels")
      for m in ("gpt4", "llama2new", "llama2orig", "mistralguard", "mistralinstruct")),
)}
SETS: dict[str, DataSet] = {n: d for n, d in CATALOGUE.items() if d.kind == "prompts"}
# JailbreakBench's Source column, per row, as an upstream source family (aird.core.sources)
JBB_SOURCE = {"Original": "jbb_original", "AdvBench": "advbench", "TDC/HarmBench": "tdc_harmbench"}
JAILBREAKS: dict[str, DataSet] = {n: d for n, d in CATALOGUE.items() if d.kind == "jailbreak"}
PLACEHOLDER = "[INSERT PROMPT HERE]"


# ---- finding files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Located:
    path: Path
    origin: str                   # "data dir" | "package"


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data directory asked for (``--data-dir``, else ``AIRD_DATA_DIR``), or None. One that does not exist is
    an error, not a silent fall-back to the bundled copy (a mistyped path would go unnoticed)."""
    root = Path(data_dir).expanduser() if data_dir else default_data_dir()
    if root is not None and not root.is_dir():
        raise DataNotFound(f"data directory {root} does not exist (--data-dir or AIRD_DATA_DIR).")
    return root


def locate(relpath: str, data_dir: str | Path | None = None) -> Located | None:
    """A data file: in the data directory (plain or ``.gz``), else in the bundled copy; None when neither has it."""
    root = resolve_data_dir(data_dir)
    if root is not None:
        for cand in (root / relpath, root / (relpath + ".gz")):
            if cand.is_file():
                return Located(cand, "data dir")
    bundled = PACKAGE_DATA / (relpath + ".gz")
    if bundled.is_file():
        return Located(bundled, "package")
    return None


def _looked_at(relpath: str, data_dir: str | Path | None) -> str:
    root = resolve_data_dir(data_dir)
    places = ([str(root / relpath)] if root else []) + [str(PACKAGE_DATA / (relpath + ".gz"))]
    return " and ".join(places)


def find_file(name: str, data_dir: str | Path | None = None) -> Located:
    """The file of a catalogue entry, or one sentence saying where aird looked."""
    ds = CATALOGUE[name]
    loc = locate(ds.relpath, data_dir)
    if loc is None:
        raise DataNotFound(f"data set {name!r} not found: looked at {_looked_at(ds.relpath, data_dir)}.")
    return loc


def wikitext_text(data_dir: str | Path | None = None) -> str:
    """WikiText-2 test, its rows joined by blank lines (perplexity and WikiText calibration)."""
    return read_text(find_file("wikitext2", data_dir).path)


# ---- jailbreaks ---------------------------------------------------------------------------------------

def load_jailbreak(name: str, data_dir: str | Path | None = None, n_templates: int = 5, seed: int = 42,
                   goals: list[Prompt] | None = None) -> list[Prompt]:
    """A jailbreak set: a JailbreakBench artifact (``jbb_gcg``, ``jbb_pair``, ``jbb_aim``,
    ``jbb_random_search``: one prompt per behaviour, already wrapped by the attack) or ``wild``:
    ``n_templates`` seeded in-the-wild templates (those with the [INSERT PROMPT HERE] slot) each filled with
    every goal (default: the JailbreakBench behaviours)."""
    if name not in JAILBREAKS:
        raise DataNotFound(f"unknown jailbreak set {name!r}; known: {', '.join(JAILBREAKS)}.")
    path = find_file(name, data_dir).path
    if name == "wild":
        templates = [r["prompt"] for r in _rows_csv(path) if PLACEHOLDER in (r.get("prompt") or "")]
        if not templates:
            raise DataNotFound(f"{path} holds no template with the {PLACEHOLDER} slot.")
        chosen = sample([Prompt(t) for t in templates], n_templates, seed)
        goals = goals if goals is not None else load_set("jailbreakbench", data_dir)
        return [Prompt(t.instruction.replace(PLACEHOLDER, g.instruction), g.category, f"wild#{k}")
                for k, t in enumerate(chosen) for g in goals]
    out = [Prompt(r["prompt"], r.get("category"), name) for r in _rows_json(path)
           if isinstance(r, dict) and r.get("prompt")]
    if not out:
        raise DataNotFound(f"{path} holds no jailbreak prompts.")
    return out


# ---- named prompt sets --------------------------------------------------------------------------------

def _from_hub(spec: DataSet) -> list[Prompt]:  # pragma: no cover - needs network
    from datasets import load_dataset

    ds_id, config, split, col = spec.hub
    ds = load_dataset(ds_id, config, split=split)
    rows = [r for r in ds if not (spec.name == "alpaca" and r.get("input"))]
    return prompts_from_rows(rows, f"hub:{ds_id}", column=col)


def _prompts_of(spec: DataSet, path: Path) -> list[Prompt]:
    rows = read_rows(path)
    if spec.where is not None:
        col, value = spec.where
        rows = [r for r in rows if isinstance(r, dict) and r.get(col) == value]
    if spec.categories is not None:
        rows = [r for r in rows if isinstance(r, dict) and r.get(spec.category_column) in spec.categories]
    return prompts_from_rows(rows, spec.name, category_column=spec.category_column,
                             origins=JBB_SOURCE if spec.origin_column else None, origin_column=spec.origin_column)


def load_set(name: str, data_dir: str | Path | None = None, allow_hub: bool = True,
             hub_loader: Callable[[DataSet], list[Prompt]] | None = None) -> list[Prompt]:
    """A named prompt set from the data directory, else the bundled copy, else the hub (when allowed)."""
    spec = SETS.get(name)
    if spec is None:
        raise DataNotFound(f"unknown prompt set {name!r}; known sets: {', '.join(SETS)}.")
    loc = locate(spec.relpath, data_dir)
    if loc is not None:
        return _prompts_of(spec, loc.path)
    where = _looked_at(spec.relpath, data_dir)
    if allow_hub and spec.hub is not None:
        try:
            return (hub_loader or _from_hub)(spec)
        except Exception as exc:  # offline, missing package, gated dataset ...
            raise DataNotFound(
                f"prompt set {name!r} is not in the data directory or the bundled copy (looked at {where}) and "
                f"the hub copy {spec.hub[0]} could not be loaded ({type(exc).__name__})."
            ) from None
    raise DataNotFound(f"prompt set {name!r} not found: looked at {where}.")


def count_rows(name: str, data_dir: str | Path | None = None) -> int:
    """The rows a catalogue entry holds where it is found: prompts for prompt sets, rows of the file for
    jailbreaks, zero-shot tasks and labels, non-empty lines for text."""
    ds = CATALOGUE[name]
    if ds.kind == "prompts":
        return len(load_set(name, data_dir, allow_hub=False))
    path = find_file(name, data_dir).path
    if ds.kind == "text":
        return sum(1 for line in read_text(path).splitlines() if line.strip())
    return len(read_rows(path))


def catalogue_status(data_dir: str | Path | None = None) -> list[dict]:
    """Every catalogue entry with where it is found (data dir, package, hub, missing) and its rows there."""
    out = []
    for ds in CATALOGUE.values():
        loc = locate(ds.relpath, data_dir)
        row = {"name": ds.name, "role": ds.role, "kind": ds.kind, "rows_documented": ds.rows,
               "license": ds.license, "description": ds.description}
        if loc is None:
            row.update(found="hub (when online)" if ds.hub else "missing", path=ds.hub[0] if ds.hub else None,
                       rows=None)
        else:
            row.update(found=loc.origin, path=str(loc.path), rows=count_rows(ds.name, data_dir))
        out.append(row)
    return out


def stratified(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """At most ``n`` prompts spread evenly over the categories (a seeded shuffle within each, then one from
    each category in turn), kept in their original order; all prompts when ``n`` is None or large enough. A
    limited run of a categorized set then still covers every category."""
    if n is None or n >= len(prompts):
        return list(prompts)
    rng = random.Random(seed)
    groups: dict[str | None, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.category, []).append(i)
    for g in groups.values():
        rng.shuffle(g)
    order = sorted(groups, key=lambda c: (c is None, str(c)))
    chosen: list[int] = []
    while len(chosen) < n:
        for c in order:
            if groups[c] and len(chosen) < n:
                chosen.append(groups[c].pop())
    return [prompts[i] for i in sorted(chosen)]


def sample(prompts: list[Prompt], n: int | None, seed: int) -> list[Prompt]:
    """A seeded sample without replacement (all prompts, shuffled, when n is None or too large)."""
    rng = random.Random(seed)
    idx = list(range(len(prompts)))
    rng.shuffle(idx)
    if n is not None:
        idx = idx[:n]
    return [prompts[i] for i in idx]
