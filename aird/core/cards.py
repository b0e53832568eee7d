"""A safety card per model of a study: what a person shipping that model needs to decide.

``card.json`` beside each model's folders holds: the sha256 of its weights file(s) and of its parent's, how it was
made (method, parameters; for a repair its layer, matrices and α), the judge behind every refusal verdict, and
its paired changes against its parent and against the original model — ASR per harmful set and over-refusal per
benign set (rates with Wilson 95% intervals and n, the change in points, the exact McNemar p), the zero-shot mean
change and the perplexity ratio with 95% paired bootstrap intervals.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from aird.core import stats
from aird.core.artifacts import atomic_write_text
from aird.core.report import _prompt_records, paired_rate, perplexity_change, zero_shot_change
from aird.core.study_results import Entry

CARD_JSON = "card.json"
CARD_SCHEMA = 1


DROPPED_WEIGHTS = "dropped-weights.sha256.json"   # in a model folder whose weights a study removed
MADE_WEIGHTS = "weights.sha256.json"              # in a study model folder: its weights' digests when made
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")


def _weights_files(folder: Path) -> list[Path]:
    return [f for f in sorted(folder.iterdir()) if f.is_file() and f.suffix in WEIGHT_SUFFIXES]


def _digests(folder: Path) -> dict[str, str]:
    out = {}
    for f in _weights_files(folder):
        h = hashlib.sha256()
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
        out[f.name] = h.hexdigest()
    return out


def record_weights(folder: str | Path) -> dict[str, str]:
    """Hash a model folder's weights files and keep the digests beside them (``MADE_WEIGHTS``): what a remade
    copy of the folder is checked against once the weights are gone (a study resumed on another machine)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    digests = _digests(folder)
    atomic_write_text(folder / MADE_WEIGHTS, json.dumps(digests, indent=1) + "\n")
    return digests


def recorded_weights(folder: str | Path) -> dict[str, str] | None:
    """The digests a study kept for a model folder (when made, or when its weights were dropped), else None."""
    for name in (MADE_WEIGHTS, DROPPED_WEIGHTS):
        f = Path(folder) / name
        if f.is_file():
            return json.loads(f.read_text())
    return None


def weights_missing(folder: str | Path) -> bool:
    """A model folder (config.json) without any weights file: dropped by a study, or never copied to this machine."""
    folder = Path(folder)
    return (folder / "config.json").is_file() and not _weights_files(folder)


def drop_weights(folder: str | Path) -> dict[str, str]:
    """Remove a model folder's weights files, first writing their sha256 beside (``DROPPED_WEIGHTS``), which
    ``weights_sha256`` then returns: the folder keeps its configuration, tokenizer and records, the card its
    digests. Returns the digests."""
    folder = Path(folder)
    digests = weights_sha256(folder)
    if not (folder / DROPPED_WEIGHTS).is_file():
        atomic_write_text(folder / DROPPED_WEIGHTS, json.dumps(digests, indent=1) + "\n")
    for f in _weights_files(folder):
        f.unlink()
    return digests


def weights_sha256(folder: str | Path | None) -> dict[str, str]:
    """sha256 of every weights file (``*.safetensors``, ``*.bin``, ``*.gguf``) of a model folder, by file name;
    empty for a folder that is not on disk. (``write_cards`` reuses a card's digests while the files' sizes and
    modification times are unchanged.)"""
    folder = _folder(folder)
    if folder is None:
        return {}
    kept = folder / DROPPED_WEIGHTS
    if kept.is_file():      # the study dropped the weights (keep_models = false) and kept their digests
        return json.loads(kept.read_text())
    if not _weights_files(folder) and (folder / MADE_WEIGHTS).is_file():   # not on this machine: as made
        return json.loads((folder / MADE_WEIGHTS).read_text())
    return _digests(folder)


def paired_rates(before: Entry, after: Entry) -> dict[str, dict]:
    """Per evaluated set, on the prompts both models answered: the rate (ASR for a harmful set, over-refusal for
    a benign one) of each with its Wilson interval and n, the change in points and its exact McNemar p."""
    a, b = _prompt_records(before), _prompt_records(after)
    if not a or not b:
        return {}
    out = {}
    for name in sorted({k[0] for k in b}):
        keys = [k for k in b if k[0] == name and k in a]
        if not keys:
            continue
        r = paired_rate(a, b, keys)
        n = r["n"]
        out[name] = {"metric": "asr" if r["harmful"] else "over_refusal", "n": n,
                     "before": r["before"], "before_ci": stats.wilson(r["k_before"], n),
                     "after": r["after"], "after_ci": stats.wilson(r["k_after"], n),
                     "change_points": round(100 * (r["after"] - r["before"]), 2), "newly_refused": r["newly"],
                     "no_longer_refused": r["gone"], "mcnemar_p": r["p"],
                     "detectable_points": round(100 * stats.mcnemar_mde(n, r["newly"] + r["gone"]), 1)}
    return out


def _against(before: Entry | None, after: Entry) -> dict | None:
    if before is None:
        return None
    zs, ppl = zero_shot_change(before, after), perplexity_change(before, after)
    return {"model": before.name, "rates": paired_rates(before, after),
            "zero_shot_mean_change": {k: zs.get(k) for k in ("estimate", "ci", "n")},
            "perplexity_ratio": {k: ppl.get(k) for k in ("estimate", "ci", "n")}}


def card(e: Entry, by: dict[str, Entry], judge: str, digests: dict[str, dict]) -> dict:
    """The card of entry ``e`` (``digests``: every entry's weights sha256, by entry name)."""
    orig = by.get("original")
    parent = by.get(e.parent) if e.parent else (orig if e.role == "compressed" else None)
    made: dict = {"role": e.role, "kind": e.kind, "method": e.method}
    if e.compress:
        made["params"] = e.compress.get("params") or e.compress.get("config")
    if e.repair:
        made.update({k: e.repair.get(k) for k in ("layer", "matrix", "alpha")})
        made["target_reached"] = (e.repair.get("validation") or {}).get("target_reached")
    return {"record": "card", "schema": CARD_SCHEMA, "model": e.name, "model_path": e.model_path,
            "weights_sha256": digests.get(e.name, {}),
            "parent": parent.name if parent else None,
            "parent_weights_sha256": digests.get(parent.name, {}) if parent else None,
            "made": made, "judge": judge,
            "vs_parent": _against(parent, e) if parent else None,
            "vs_original": _against(orig, e) if orig is not None and orig is not e and orig is not parent else None}


def _folder(spec: str | Path | None) -> Path | None:
    """The local folder of a model: the path itself, or a named model's installed folder; None otherwise."""
    if not spec:
        return None
    if Path(spec).is_dir():
        return Path(spec)
    from aird.core import registry

    named = registry.lookup(str(spec))
    if named is None:
        return None
    try:
        from aird.core.loading import resolve_model_path

        path = resolve_model_path(str(spec))
    except Exception:   # not installed here: a card without digests, not a failed study
        return None
    return Path(path) if Path(path).is_dir() else None


def _stamp(folder: str | None) -> list:
    folder = _folder(folder)
    if folder is None:
        return []
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in _weights_files(folder)]


def write_cards(entries: list[Entry], judge: str) -> list[dict]:
    """Write each entry's card.json into its folder (atomically) and return the cards. Each model's weights are
    hashed once (a parent's digest is its own card's), and not again while their sizes and times are unchanged
    since the card that recorded them."""
    by = {e.name: e for e in entries}
    paths = {e.name: Path(e.folder) / CARD_JSON for e in entries}
    stamps, digests = {}, {}
    for e in entries:
        previous = json.loads(paths[e.name].read_text()) if paths[e.name].is_file() else {}
        stamps[e.name] = _stamp(e.model_path)
        digests[e.name] = (previous["weights_sha256"] if previous.get("_stamp") == stamps[e.name]
                           and "weights_sha256" in previous else weights_sha256(e.model_path))
    cards = []
    for e in entries:
        c = {**card(e, by, judge, digests), "_stamp": stamps[e.name]}
        atomic_write_text(paths[e.name], json.dumps(c, indent=1) + "\n")
        cards.append(c)
    return cards
