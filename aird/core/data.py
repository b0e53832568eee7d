"""Instruction sets: the reference harmful/harmless splits, AdvBench, JailbreakBench, Alpaca, a user's file.

Sets are read from a data directory (``--data-dir``, env ``AIRD_DATA_DIR``, default ``../shared/data`` beside
the repository when it exists). When a set is missing there and the caller allows it, the public hub dataset
is loaded instead (needs network access and the ``datasets`` package).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aird.core.env import default_data_dir
from aird.core.errors import DataNotFound


@dataclass(frozen=True)
class Prompt:
    instruction: str
    category: str | None = None
    source: str = ""


def _rows_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
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
    return data


def _rows_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataNotFound(f"prompt file {path} does not exist.")
    if path.suffix == ".csv":
        return _rows_csv(path)
    if path.suffix in (".json", ".jsonl"):
        return _rows_json(path)
    if path.suffix == ".txt":
        return [{"instruction": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    raise DataNotFound(f"prompt file {path} is not CSV, JSON, JSONL or TXT.")


_TEXT_COLUMNS = ("instruction", "goal", "Goal", "prompt", "Behavior", "text", "question")
_CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory")


def prompts_from_rows(rows: list, source: str, column: str | None = None,
                      category_column: str | None = None) -> list[Prompt]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, str):
            out.append(Prompt(row, None, source))
            continue
        if not isinstance(row, dict):
            raise DataNotFound(f"{source}: row {i} is neither text nor an object.")
        col = column or next((c for c in _TEXT_COLUMNS if c in row), None)
        if col is None or col not in row:
            raise DataNotFound(f"{source}: row {i} has no text column ({column or ' / '.join(_TEXT_COLUMNS)}).")
        text = row[col]
        if not isinstance(text, str) or not text.strip():
            continue
        cat_col = category_column or next((c for c in _CATEGORY_COLUMNS if c in row), None)
        cat = row.get(cat_col) if cat_col else None
        out.append(Prompt(text.strip(), str(cat) if cat not in (None, "") else None, source))
    if not out:
        raise DataNotFound(f"{source} holds no prompts.")
    return out


def load_prompt_file(path: str | Path, column: str | None = None, category_column: str | None = None) -> list[Prompt]:
    p = Path(path).expanduser()
    return prompts_from_rows(read_rows(p), str(p), column, category_column)


# ---- named sets ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PromptSet:
    name: str
    relpath: str
    description: str
    hub: tuple[str, str | None, str, str] | None = None   # (dataset id, config, split, text column)


SETS: dict[str, PromptSet] = {
    s.name: s
    for s in (
        PromptSet("harmful_train", "refusal_direction/splits/harmful_train.json", "reference harmful train split (Arditi et al.)"),
        PromptSet("harmful_val", "refusal_direction/splits/harmful_val.json", "reference harmful validation split"),
        PromptSet("harmless_train", "refusal_direction/splits/harmless_train.json", "reference harmless (Alpaca) train split"),
        PromptSet("harmless_val", "refusal_direction/splits/harmless_val.json", "reference harmless (Alpaca) validation split"),
        PromptSet("harmless_test", "refusal_direction/splits/harmless_test.json", "reference harmless (Alpaca) test split"),
        PromptSet("advbench", "advbench/harmful_behaviors.csv", "AdvBench harmful behaviours (520)",
                  ("walledai/AdvBench", None, "train", "prompt")),
        PromptSet("jailbreakbench", "jailbreakbench/harmful-behaviors.csv", "JailbreakBench harmful behaviours (100)",
                  ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal")),
        PromptSet("jailbreakbench_benign", "jailbreakbench/benign-behaviors.csv", "JailbreakBench benign twins (100)",
                  ("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal")),
        PromptSet("alpaca", "refusal_direction/processed/alpaca.json", "Alpaca instructions with empty input",
                  ("tatsu-lab/alpaca", None, "train", "instruction")),
    )
}


# ---- jailbreaks ---------------------------------------------------------------------------------------

# JailbreakBench's published attack artifacts: one prompt per behaviour, already wrapped by the attack.
JAILBREAK_ARTIFACTS = {
    "jbb_gcg": ("GCG transfer suffixes", "jailbreakbench/artifacts/GCG/transfer/gpt-3.5-turbo-1106.json"),
    "jbb_pair": ("PAIR prompts", "jailbreakbench/artifacts/PAIR/black_box/vicuna-13b-v1.5.json"),
    "jbb_aim": ("AIM template (jailbreakchat)", "jailbreakbench/artifacts/JBC/manual/vicuna-13b-v1.5.json"),
    "jbb_random_search": ("prompt with random search", "jailbreakbench/artifacts/prompt_with_random_search/black_box/vicuna-13b-v1.5.json"),
}
WILD_TEMPLATES = "jailbreak_llms/jailbreak_prompts_2023_12_25.csv"
PLACEHOLDER = "[INSERT PROMPT HERE]"


def load_jailbreak(name: str, data_dir: str | Path | None = None, n_templates: int = 5, seed: int = 42,
                   goals: list[Prompt] | None = None) -> list[Prompt]:
    """A jailbreak set: a JailbreakBench artifact (``jbb_gcg``, ``jbb_pair``, ``jbb_aim``,
    ``jbb_random_search``) or ``wild``: ``n_templates`` seeded in-the-wild templates (those with the
    [INSERT PROMPT HERE] slot) each filled with every goal (default: the JailbreakBench behaviours)."""
    root = resolve_data_dir(data_dir)
    if name in JAILBREAK_ARTIFACTS:
        rel = JAILBREAK_ARTIFACTS[name][1]
        path = root / rel if root else None
        if path is None or not path.is_file():
            raise DataNotFound(f"jailbreak set {name!r} not found: looked at {path or 'no data directory'}.")
        rows = _rows_json(path)
        out = [Prompt(r["prompt"], r.get("category"), name) for r in rows if isinstance(r, dict) and r.get("prompt")]
        if not out:
            raise DataNotFound(f"{path} holds no jailbreak prompts.")
        return out
    if name == "wild":
        path = root / WILD_TEMPLATES if root else None
        if path is None or not path.is_file():
            raise DataNotFound(f"in-the-wild jailbreak templates not found: looked at {path or 'no data directory'}.")
        templates = [r["prompt"] for r in _rows_csv(path) if PLACEHOLDER in (r.get("prompt") or "")]
        if not templates:
            raise DataNotFound(f"{path} holds no template with the {PLACEHOLDER} slot.")
        chosen = sample([Prompt(t) for t in templates], n_templates, seed)
        goals = goals if goals is not None else load_set("jailbreakbench", data_dir)
        return [Prompt(t.instruction.replace(PLACEHOLDER, g.instruction), g.category, f"wild#{k}")
                for k, t in enumerate(chosen) for g in goals]
    raise DataNotFound(f"unknown jailbreak set {name!r}; known: {', '.join([*JAILBREAK_ARTIFACTS, 'wild'])}.")


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    return Path(data_dir).expanduser() if data_dir else default_data_dir()


def _from_hub(spec: PromptSet) -> list[Prompt]:  # pragma: no cover - needs network
    from datasets import load_dataset

    ds_id, config, split, col = spec.hub
    ds = load_dataset(ds_id, config, split=split)
    rows = [r for r in ds if not (spec.name == "alpaca" and r.get("input"))]
    return prompts_from_rows(rows, f"hub:{ds_id}", column=col)


def load_set(name: str, data_dir: str | Path | None = None, allow_hub: bool = True,
             hub_loader: Callable[[PromptSet], list[Prompt]] | None = None) -> list[Prompt]:
    """Load a named set from the data directory, or from the hub when it is missing and allowed."""
    spec = SETS.get(name)
    if spec is None:
        raise DataNotFound(f"unknown prompt set {name!r}; known sets: {', '.join(SETS)}.")
    root = resolve_data_dir(data_dir)
    path = root / spec.relpath if root else None
    if path is not None and path.is_file():
        return prompts_from_rows(read_rows(path), name)
    where = str(path) if path else "no data directory (set --data-dir or AIRD_DATA_DIR)"
    if allow_hub and spec.hub is not None:
        try:
            return (hub_loader or _from_hub)(spec)
        except Exception as exc:  # offline, missing package, gated dataset ...
            raise DataNotFound(
                f"prompt set {name!r} is not in the data directory (looked at {where}) and the hub copy "
                f"{spec.hub[0]} could not be loaded ({type(exc).__name__})."
            ) from None
    raise DataNotFound(f"prompt set {name!r} not found: looked at {where}.")


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
