"""`aird diff`: how compression moved the refusal direction.

Compares two probe folders made with the same prompts and seed: cosine similarity of the candidate
directions at every layer and position, of the two chosen directions, where each chosen direction comes from
(its source) and how good it is (its bypass / induce / KL scores), and how the ORIGINAL model's direction
scores inside the COMPRESSED model (does the old direction still work there?).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aird.core.artifacts import Run, load_tensors, read_jsonl, write_jsonl
from aird.core.directions import cosine
from aird.core.errors import ArtifactError
from aird.core.loading import LoadedModel
from aird.core.probe import DIRECTIONS, config_from_record, load_prompt_sets, load_probe, prepare_validation
from aird.core.progress import Reporter
from aird.core.candidates import score_candidate

DIFF_JSONL = "diff.jsonl"
HEATMAP = "diff.png"
# what must agree for two probes to be comparable
SAME = ("n_train", "n_val", "seed", "method", "filter_prompts", "system_prompt", "harmful_train",
        "harmless_train", "harmful_val", "harmless_val")


@dataclass
class ProbeRun:
    path: Path
    summary: dict
    directions: torch.Tensor       # [L, P, d]
    chosen: torch.Tensor           # [d]


def open_probe(path: Path) -> ProbeRun:
    summary, chosen, _ = load_probe(path)
    path = Path(path)
    if path.is_file():
        path = path.parent
    return ProbeRun(path, summary, load_tensors(path / DIRECTIONS)["directions"], chosen)


def check_comparable(a: ProbeRun, b: ProbeRun) -> None:
    if a.directions.shape != b.directions.shape:
        raise ArtifactError(
            f"the probes are not comparable: directions of shape {tuple(a.directions.shape)} and "
            f"{tuple(b.directions.shape)} (different model architectures?).")
    ca, cb = a.summary["config"], b.summary["config"]
    diff = [k for k in SAME if ca.get(k) != cb.get(k)]
    if diff:
        raise ArtifactError(f"the probes were made with different settings ({', '.join(diff)}); rerun one of them "
                            "with the other's options.")


def cosine_report(a: ProbeRun, b: ProbeRun) -> dict:
    matrix = cosine(a.directions, b.directions)                       # [L, P]
    # a zero candidate (the same template tokens on both sides, e.g. at layer 0) has no direction: undefined
    na, nb = a.directions.norm(dim=-1), b.directions.norm(dim=-1)
    matrix[(na <= 1e-6 * na.max()) | (nb <= 1e-6 * nb.max())] = float("nan")
    pos = a.summary["positions"]
    src_pos = pos.index(a.summary["source"]["position"])
    sa, sb = a.summary["source"], b.summary["source"]
    return {
        "cosine_chosen": cosine(a.chosen, b.chosen).item(),
        # the compressed model's direction at the original's source, and the original direction against the
        # compressed model's candidates at the original source position, layer by layer
        "cosine_at_original_source": matrix[sa["layer"], src_pos].item(),
        "cosine_by_layer": [None if v != v else v for v in matrix[:, src_pos].tolist()],
        "cosine_matrix": [[None if v != v else v for v in row] for row in matrix.tolist()],
        "source": {"original": sa, "compressed": sb, "moved": sa != sb,
                   "layer_shift": sb["layer"] - sa["layer"]},
    }


def run_diff(original: Path, compressed: Path, out: Path | None = None, lm: LoadedModel | None = None,
             force: bool = False, reporter: Reporter | None = None) -> dict:
    """Compare two probe folders; with ``lm`` (the compressed model loaded) also score the original
    direction inside it."""
    rep = reporter or Reporter()
    a, b = open_probe(original), open_probe(compressed)
    check_comparable(a, b)
    out = Path(out) if out else b.path / "diff"
    jsonl = out / DIFF_JSONL
    config = {"original": str(a.path), "compressed": str(b.path), "score_original_in_compressed": lm is not None}
    if jsonl.exists() and not force:
        done = [r for r in read_jsonl(jsonl) if r["record"] == "diff.summary"]
        if done and done[0]["config"] == config:
            return {**done[0], "resumed": True}
    t0 = time.perf_counter()
    report = cosine_report(a, b)
    quality = {"original": a.summary["quality"], "compressed": b.summary["quality"], "original_in_compressed": None}
    if lm is not None:
        cfg = config_from_record(b.summary["config"])
        sets = load_prompt_sets(cfg)
        ids = lm.adapter.refusal_token_ids(lm.tokenizer)
        val, baseline, _, _ = prepare_validation(lm, cfg, sets, ids, rep)
        layer = a.summary["source"]["layer"]
        with rep.stage("scoring the original direction in the compressed model", 1) as advance:
            s = score_candidate(lm, val, a.chosen, layer)
            advance(1)
        quality["original_in_compressed"] = {"bypass": s.bypass, "induce": s.induce, "kl": s.kl, "layer": layer}
    run = Run("diff", b.summary["model"], config, b.summary["seed"])
    summary = run.record(
        "diff.summary", original_model=a.summary["model"], compressed_model=b.summary["model"],
        n_layers=a.summary["n_layers"], positions=a.summary["positions"],
        baseline={"original": a.summary["baseline"], "compressed": b.summary["baseline"]},
        quality=quality, **report, out=str(out), seconds=round(time.perf_counter() - t0, 3),
    )
    write_jsonl(jsonl, [summary])
    try:
        from aird.core.plots import plot_cosine

        plot_cosine(out / HEATMAP, summary)
    except Exception as exc:  # a plot must never cost the run its results
        rep.note(f"could not draw {HEATMAP}: {exc}")
    return summary
