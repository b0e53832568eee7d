"""PNG plots of artifacts (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

MAX_CATEGORIES = 30   # bars per panel: beyond that a chart is unreadable (and matplotlib may refuse its size)


def never_fails(fn):
    """A plot is a view of records already written: if drawing it fails, the run goes on (one line on stderr,
    no file), never loses its results."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:   # noqa: BLE001 - any plotting failure is reported and survived
            try:
                _pyplot().close("all")
            except Exception:
                pass
            print(f"aird: warning: the plot {fn.__name__.removeprefix('plot_')} was not drawn "
                  f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the results are kept.",
                  file=sys.stderr)
            return False
    return wrapper


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure atomically (temp file, then rename) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
    plt.close(fig)


@never_fails
def plot_probe(path: Path, n_layers: int, positions: list[int], scored: list[dict], proxy: dict, summary: dict) -> None:
    """Bypass (full score, and the ranking proxy where it was used) and induce score by layer, one line per
    post-instruction position; the chosen candidate is starred."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, pos in enumerate(positions):
        c = colors[i % len(colors)]
        if proxy:
            pts = sorted((lay, v) for (lay, p), v in proxy.items() if p == pos)
            axes[0].plot([a for a, _ in pts], [b for _, b in pts], "--", color=c, alpha=0.5, lw=1)
        full = sorted((r["layer"], r["bypass"], r["induce"]) for r in scored
                      if r["position"] == pos and r["bypass"] is not None and r["induce"] is not None)
        if full:
            axes[0].plot([a for a, *_ in full], [b for _, b, _ in full], "o-" if len(full) > 1 else "o", color=c,
                         label=f"pos {pos}")
            axes[1].plot([a for a, *_ in full], [x for *_, x in full], "o-" if len(full) > 1 else "o", color=c,
                         label=f"pos {pos}")
    src = summary["source"]
    axes[0].plot([src["layer"]], [summary["quality"]["bypass"]], "k*", ms=14, label="chosen")
    axes[1].plot([src["layer"]], [summary["quality"]["induce"]], "k*", ms=14)
    base = summary["baseline"]
    axes[0].axhline(base["harmful_refusal_score"], color="grey", ls=":", lw=1, label="harmful baseline")
    axes[1].axhline(base["harmless_refusal_score"], color="grey", ls=":", lw=1, label="harmless baseline")
    axes[0].set_title("bypass: harmful prompts, direction ablated\n(dashed: attribution proxy)", fontsize=10)
    axes[1].set_title("induce: harmless prompts, direction added", fontsize=10)
    for ax in axes:
        ax.set_xlabel("source layer")
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.axhline(0, color="black", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(f"{summary['model']}: chosen layer {src['layer']}, position {src['position']} (refusal scores)", y=1.03)
    _save(fig, path)


@never_fails
def plot_cosine(path: Path, summary: dict) -> None:
    """Heatmap of the cosine similarity between the original and compressed candidate directions, by layer
    (rows) and post-instruction position (columns); the two chosen sources are marked."""
    import numpy as np

    plt = _pyplot()
    m = np.array([[np.nan if v is None else v for v in row] for row in summary["cosine_matrix"]], dtype=float)
    fig, ax = plt.subplots(figsize=(4 + 0.4 * m.shape[1], 0.28 * m.shape[0] + 1.5))
    im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=min(0.0, np.nanmin(m)) if np.isfinite(m).any() else 0, vmax=1)
    pos = summary["positions"]
    ax.set_xticks(range(len(pos)), [str(p) for p in pos])
    ax.set_xlabel("post-instruction position")
    ax.set_ylabel("layer")
    src = summary["source"]
    ax.plot(pos.index(src["original"]["position"]), src["original"]["layer"], "w*", ms=12, label="original source")
    ax.plot(pos.index(src["compressed"]["position"]), src["compressed"]["layer"], "r^", ms=8, label="compressed source")
    ax.legend(fontsize=7, loc="lower right")
    fig.colorbar(im, ax=ax, label="cosine similarity")
    ax.set_title(f"cosine(original, compressed); chosen: {summary['cosine_chosen']:.3f}", fontsize=9)
    _save(fig, path)


@never_fails
def plot_asr(path: Path, summaries: dict[str, dict]) -> bool:
    """Bar chart of ASR per category, one panel per harmful set that has categories (and one bar group of
    overall ASR per set), one bar colour per model. ``summaries`` maps a model label to its eval summary.
    Returns False (and writes nothing) when no model has an ASR."""
    import numpy as np

    plt = _pyplot()
    labels = list(summaries)
    sets = sorted({n for s in summaries.values() for n in s.get("asr", {})})
    if not sets:
        return False
    panels = [("overall", sets, {m: [summaries[m]["asr"].get(n) for n in sets] for m in labels})]
    for n in sets:
        cats = sorted({c for s in summaries.values() for c in s.get("asr_by_category", {}).get(n, {})})
        if len(cats) > MAX_CATEGORIES:   # the categories with the highest ASR of any model
            top = lambda c: max((summaries[m].get("asr_by_category", {}).get(n, {}).get(c) or 0) for m in labels)  # noqa: E731
            cats = sorted(sorted(cats, key=top, reverse=True)[:MAX_CATEGORIES])
        if len(cats) > 1:
            panels.append((n, cats, {m: [summaries[m].get("asr_by_category", {}).get(n, {}).get(c) for c in cats]
                                     for m in labels}))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.55 * max(len(p[1]) for p in panels) * len(labels) + 2),
                                                      3.2 * len(panels)), squeeze=False)
    width = 0.8 / len(labels)
    for ax, (title, keys, vals) in zip(axes[:, 0], panels):
        x = np.arange(len(keys))
        for i, m in enumerate(labels):
            ys = [np.nan if v is None else v for v in vals[m]]
            ax.bar(x + (i - (len(labels) - 1) / 2) * width, ys, width, label=m)
        ax.set_xticks(x, keys, rotation=30 if len(keys) > 4 else 0, ha="right" if len(keys) > 4 else "center",
                      fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("ASR")
        ax.set_title("ASR by set" if title == "overall" else f"ASR by category: {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True


@never_fails
def plot_refusal_scores(path: Path, scores: dict[str, dict[str, list[float]]]) -> bool:
    """Distributions of the refusal score (log-odds of the refusal tokens at the first generated position),
    harmful against benign prompts, one panel per model. ``scores`` maps a model label to {role: scores}."""
    import numpy as np

    plt = _pyplot()
    labels = [m for m in scores if any(scores[m].values())]
    if not labels:
        return False
    allv = [v for m in labels for vs in scores[m].values() for v in vs]
    bins = np.linspace(min(allv), max(allv), 30)
    cols = min(3, len(labels))
    rows = (len(labels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for ax, m in zip(axes.flat, labels):
        for role, color in (("harmful", "tab:red"), ("benign", "tab:blue")):
            if scores[m].get(role):
                ax.hist(scores[m][role], bins=bins, alpha=0.55, color=color, label=role)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("refusal score", fontsize=8)
    for ax in list(axes.flat)[len(labels):]:
        ax.axis("off")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return True
