"""PNG plots of artifacts (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import os
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


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
    plt.close(fig)


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
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(fig, path)
    plt.close(fig)
