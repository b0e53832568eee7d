"""The statistics behind aird's verdicts: every rate with its interval, every comparison with a paired test.

- Rates: Wilson 95% score intervals.
- Paired binary outcomes (the same prompts answered by two models): the exact McNemar test, and the smallest
  change the test could detect at that n.
- Paired continuous outcomes (zero-shot accuracy per question, WikiText-2 loss per window): paired bootstrap
  confidence intervals (percentile, seeded), resampling the shared items, stratified by task.
- Rank correlation across the compression grid: Spearman's ρ with an exact permutation p-value (all n!
  orderings up to n = 8, a seeded Monte-Carlo sample beyond).
- Two groups of models (pruning vs quantization): an exact permutation test of the difference in means.
- Three verdicts: a directional claim *holds* when its one-sided test rejects at α, *does not hold* when the
  opposite one-sided test rejects, and is *inconclusive* otherwise; an "unchanged" claim holds when the 95%
  interval of the change lies inside the equivalence margin, does not hold when it lies wholly outside, and is
  inconclusive when it straddles the margin.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Sequence

ALPHA = 0.05
Z95 = 1.959963984540054
HOLDS, DOES_NOT_HOLD, INCONCLUSIVE, NOT_TESTED = "holds", "does not hold", "inconclusive", "not tested"


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n (None when n is 0)."""
    if n <= 0:
        return None
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar test: the binomial probability of a split of the ``b + c`` discordant pairs at
    least as uneven as ``b`` vs ``c`` when either change is equally likely."""
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


def mcnemar_floor(alpha: float = ALPHA) -> int:
    """The fewest discordant pairs, all changed the same way, that the exact two-sided McNemar test can call
    significant at ``alpha`` (6 at 0.05: p = 2/64)."""
    m = 1
    while mcnemar_exact(m, 0) >= alpha:
        m += 1
    return m


def mcnemar_mde(n: int, discordant: int | None = None, alpha: float = ALPHA, power: float = 0.8) -> float | None:
    """The smallest change of a paired rate (as a share of ``n``) that the exact McNemar test detects at
    ``alpha`` with probability ``power``: the normal approximation δ = (z₁₋α/₂ + z_power)·√(p_d / n), p_d the
    observed share of discordant pairs (at least the floor of ``mcnemar_floor``), and never below the
    floor's own mcnemar_floor()/n — fewer changed prompts than that can never reach significance."""
    if n <= 0:
        return None
    floor = mcnemar_floor(alpha) / n
    z_power = _z(power)
    pd = max((discordant or 0) / n, floor)
    return min(1.0, max(floor, (_z(1 - alpha / 2) + z_power) * math.sqrt(pd / n)))


def _z(q: float) -> float:
    """Standard normal quantile."""
    from statistics import NormalDist

    return NormalDist().inv_cdf(q)


def _interval95(draws: list[float]) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of bootstrap draws (sorted in place)."""
    draws.sort()
    n = len(draws)
    return draws[int(0.025 * n)], draws[min(n - 1, int(math.ceil(0.975 * n)) - 1)]


def paired_bootstrap(before: Sequence[Sequence[float]], after: Sequence[Sequence[float]], iters: int = 2000,
                     seed: int = 0, stat=None) -> dict:
    """Paired bootstrap of a change over strata (tasks): ``before[s][i]`` and ``after[s][i]`` are item i of
    stratum s under the two models. The statistic is, by default, the mean over strata of each stratum's mean
    change (the zero-shot mean's change); ``stat(before_strata, after_strata)`` replaces it. Items are
    resampled with replacement within each stratum. Returns the estimate and its 95% percentile interval."""
    strata = [(list(a), list(b)) for a, b in zip(before, after) if len(a)]
    for a, b in strata:
        if len(a) != len(b):
            raise ValueError("paired bootstrap: the two models must have the same items")
    if not strata:
        return {"estimate": None, "ci": None, "n": 0, "iters": iters}
    stat = stat or (lambda A, B: sum(sum(b) / len(b) - sum(a) / len(a) for a, b in zip(A, B)) / len(A))
    est = stat([a for a, _ in strata], [b for _, b in strata])
    rng = random.Random(seed)
    draws = []
    for _ in range(iters):
        A, B = [], []
        for a, b in strata:
            idx = [rng.randrange(len(a)) for _ in range(len(a))]
            A.append([a[i] for i in idx])
            B.append([b[i] for i in idx])
        draws.append(stat(A, B))
    lo, hi = _interval95(draws)
    return {"estimate": est, "ci": (lo, hi), "n": sum(len(a) for a, _ in strata), "iters": iters}


def mean_ci(values: Sequence[float], iters: int = 2000, seed: int = 0) -> dict:
    """A mean and its 95% percentile bootstrap interval."""
    vals = list(values)
    if not vals:
        return {"estimate": None, "ci": None, "n": 0, "iters": iters}
    zero = [0.0] * len(vals)
    r = paired_bootstrap([zero], [vals], iters, seed)
    return {**r, "ci": list(r["ci"])}


def gap_removed(base_harmful: Sequence[float], ablated_harmful: Sequence[float], base_harmless: Sequence[float],
                iters: int = 2000, seed: int = 0) -> dict:
    """The share of the harmful–harmless gap in refusal score that ablating a direction removes:
    mean(base_h − ablated_h) / (mean(base_h) − mean(base_b)), with its 95% percentile bootstrap interval
    (harmful prompts resampled in pairs, harmless ones independently). 1 means ablation brings the harmful
    prompts down to the harmless ones' level; above 1, below it. None when there is no positive gap."""
    bh, ah, bb = list(base_harmful), list(ablated_harmful), list(base_harmless)
    if len(bh) != len(ah):
        raise ValueError("gap_removed: baseline and ablated scores must be of the same prompts")
    if not bh or not bb:
        return {"estimate": None, "ci": None, "n_harmful": len(bh), "n_harmless": len(bb), "iters": iters}

    def share(h_idx, b_idx):
        gap = sum(bh[i] for i in h_idx) / len(h_idx) - sum(bb[i] for i in b_idx) / len(b_idx)
        if gap <= 0:
            return None
        return sum(bh[i] - ah[i] for i in h_idx) / len(h_idx) / gap

    est = share(range(len(bh)), range(len(bb)))
    rng = random.Random(seed)
    draws = []
    for _ in range(iters):
        v = share([rng.randrange(len(bh)) for _ in bh], [rng.randrange(len(bb)) for _ in bb])
        draws.append(-math.inf if v is None else v)   # no gap in a resample: nothing removed counts lowest
    lo, hi = _interval95(draws)
    return {"estimate": est, "ci": None if est is None else [None if math.isinf(x) else x for x in (lo, hi)],
            "n_harmful": len(bh), "n_harmless": len(bb), "iters": iters}


def perplexity_ratio(before_nll: Sequence[float], after_nll: Sequence[float], tokens_per_window: int,
                     iters: int = 2000, seed: int = 0) -> dict:
    """Paired bootstrap of the perplexity ratio after/before over evaluation windows of ``tokens_per_window``
    scored tokens each (each value a window's summed token loss): exp(Δ mean loss per token) and its 95%
    interval."""
    t = max(1, int(tokens_per_window))

    def ratio(A, B):
        return math.exp((sum(B[0]) - sum(A[0])) / (len(A[0]) * t))

    if len(before_nll) != len(after_nll) or not before_nll:
        return {"estimate": None, "ci": None, "n": 0, "iters": iters}
    return paired_bootstrap([before_nll], [after_nll], iters, seed, stat=ratio)


def ranks(v: Sequence[float]) -> list[float]:
    """Ranks from 0, ties sharing their mean rank."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(v):
        j = i
        while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    vx = math.sqrt(sum((a - mx) ** 2 for a in x))
    vy = math.sqrt(sum((b - my) ** 2 for b in y))
    return None if vx == 0 or vy == 0 else cov / (vx * vy)


def spearman(xs: Sequence[float], ys: Sequence[float], exact_up_to: int = 8, draws: int = 20000,
             seed: int = 0) -> dict:
    """Spearman's ρ and its one-sided permutation p-values (``p_greater``: ρ this large or larger when y's
    order is unrelated to x's; ``p_less`` the other way): exact over all orderings up to ``exact_up_to``
    points, else from ``draws`` seeded random orderings. ρ None when either variable is constant or n < 3."""
    n = len(xs)
    if n < 3 or n != len(ys):
        return {"rho": None, "p_greater": None, "p_less": None, "n": n, "exact": None}
    rx, ry = ranks(xs), ranks(ys)
    rho = _pearson(rx, ry)
    if rho is None:
        return {"rho": None, "p_greater": None, "p_less": None, "n": n, "exact": None}
    if n <= exact_up_to:
        perms = itertools.permutations(ry)
        total = math.factorial(n)
        exact = True
    else:
        rng = random.Random(seed)

        def gen():
            for _ in range(draws):
                p = list(ry)
                rng.shuffle(p)
                yield p

        perms, total, exact = gen(), draws, False
    ge = le = 0
    for p in perms:
        r = _pearson(rx, p) or 0.0
        ge += r >= rho - 1e-12
        le += r <= rho + 1e-12
    if not exact:   # the observed ordering counts as one of the draws
        ge, le, total = ge + 1, le + 1, total + 1
    return {"rho": rho, "p_greater": ge / total, "p_less": le / total, "n": n, "exact": exact}


def permutation_means(a: Sequence[float], b: Sequence[float]) -> dict:
    """Exact permutation test of mean(a) − mean(b) over every split of the pooled values into groups of the
    two sizes: one-sided p-values for a's mean being the smaller (``p_less``) or the larger (``p_greater``)."""
    pooled = list(a) + list(b)
    na = len(a)
    if not a or not b:
        return {"difference": None, "p_less": None, "p_greater": None, "splits": 0}
    obs = sum(a) / na - sum(b) / len(b)
    le = ge = total = 0
    for idx in itertools.combinations(range(len(pooled)), na):
        s = set(idx)
        ga = [pooled[i] for i in idx]
        gb = [pooled[i] for i in range(len(pooled)) if i not in s]
        d = sum(ga) / na - sum(gb) / len(gb)
        le += d <= obs + 1e-12
        ge += d >= obs - 1e-12
        total += 1
    return {"difference": obs, "p_less": le / total, "p_greater": ge / total, "splits": total}


def directional(p_claimed: float | None, p_opposite: float | None, alpha: float = ALPHA) -> str:
    """The verdict on a directional claim from its two one-sided p-values."""
    if p_claimed is None or p_opposite is None:
        return NOT_TESTED
    if p_claimed < alpha:
        return HOLDS
    if p_opposite < alpha:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def equivalence(ci: tuple[float, float] | None, margin: float) -> str:
    """The verdict on "unchanged within ±margin" from the change's 95% interval."""
    if ci is None:
        return NOT_TESTED
    lo, hi = ci
    if -margin <= lo and hi <= margin:
        return HOLDS
    if hi < -margin or lo > margin:
        return DOES_NOT_HOLD
    return INCONCLUSIVE


def combine(verdicts: Sequence[str]) -> str:
    """One verdict for a claim checked on several models: holds when it holds on every one, does not hold
    when it fails on one, inconclusive otherwise (some inconclusive, none failed)."""
    real = [v for v in verdicts if v != NOT_TESTED]
    if not real:
        return NOT_TESTED
    if any(v == DOES_NOT_HOLD for v in real):
        return DOES_NOT_HOLD
    if all(v == HOLDS for v in real):
        return HOLDS
    return INCONCLUSIVE
