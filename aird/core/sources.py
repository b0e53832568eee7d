"""Where prompts come from, and which of them a probe or a repair has seen.

A repair tuned on some prompts must be judged on others. Two facts make that harder than splitting by set name:
the reference harmful splits the probe and the repair use are drawn from AdvBench, MaliciousInstruct and
TDC 2023 / HarmBench, so 117 of AdvBench's 520 goals are in them word for word; and JailbreakBench took 45 of
its 100 behaviours from AdvBench and TDC/HarmBench, rephrased. So aird tracks two things per prompt:

- its **origin**: the upstream source family it was written for (``advbench``, ``malicious_instruct``,
  ``tdc_harmbench``, ``jbb_original``, ``xstest``, ``alpaca``, or the set's own name), from the set, a source
  column (JailbreakBench's ``Source``) or, for the reference splits, the source set that holds it word for word;
- whether it was **seen**: an exact match (after normalising case, punctuation and spaces) or a near duplicate
  (Jaccard similarity of content words ≥ 0.5, with at least three content words in common) of a prompt the probe
  or the repair used. On the bundled data that flags 12 of JailbreakBench's 45 behaviours taken from
  AdvBench/TDC/HarmBench (1 word for word, 11 near) and none of its 55 original ones (whose closest match scores
  0.38); without the three-word floor, short XSTest questions matched unrelated Alpaca ones.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

from aird.core.data import CATALOGUE, Prompt, load_set

# What a probe reads with its default configuration (and what repair ranks and tunes on by default).
from aird.core.configs import SEEN_BY_PROBE  # noqa: E402,F401  (re-exported)
NEAR_DUPLICATE = 0.5
MIN_SHARED = 3          # and at least this many content words in common: short questions match by chance

# A set's origin when its rows do not say otherwise.
SET_ORIGIN = {"advbench": "advbench", "malicious_instruct": "malicious_instruct", "tdc2023": "tdc_harmbench",
              "harmbench_val": "tdc_harmbench", "jailbreakbench": "jbb_original", "xstest_unsafe": "xstest",
              "xstest_safe": "xstest", "xstest_safe_t1_4": "xstest", "xstest_safe_t5_10": "xstest",
              "xstest_unsafe_t1_4": "xstest", "xstest_unsafe_t5_10": "xstest", "jailbreakbench_benign": "jbb_original", "alpaca": "alpaca",
              "harmless_train": "alpaca", "harmless_val": "alpaca", "harmless_test": "alpaca"}
# The sets whose rows are the reference splits' upstream sources, looked up word for word.
_UPSTREAM = ("advbench", "malicious_instruct", "tdc2023", "harmbench_val")

_STOP = frozenset("""a an the to of for and or in on at by with from into about as is are be can how what that this
these those i me my you your it its we our they their he she his her someone somebody something write create give
provide detailed instructions step guide explain describe tell make list""".split())


def normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _STOP)


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class SeenIndex:
    """The prompts a probe or repair used: exact (normalised) and near-duplicate look-ups. Near duplicates are
    found by prefix filtering: two word sets with Jaccard ≥ t share at least one of the rarest
    ⌊(1 − t)·|A|⌋ + 1 words of A, so only the postings of those words are scored (exact, and fast on 25k
    prompts)."""

    def __init__(self, texts: Iterable[str], near: float = NEAR_DUPLICATE):
        self.near = near
        self.exact: set[str] = set()
        self.words: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = defaultdict(list)
        for t in texts:
            n = normalize(t)
            if n in self.exact:
                continue
            self.exact.add(n)
            w = content_words(t)
            for x in w:
                self.postings[x].append(len(self.words))
            self.words.append(w)

    def __len__(self) -> int:
        return len(self.exact)

    def match(self, text: str) -> str | None:
        """"exact", "near" or None."""
        if normalize(text) in self.exact:
            return "exact"
        a = content_words(text)
        if not a:
            return None
        rare = sorted(a, key=lambda x: len(self.postings.get(x, ())))
        k = int((1 - self.near) * len(a)) + 1
        seen_ids: set[int] = set()
        for x in rare[:k]:
            for i in self.postings.get(x, ()):
                if i not in seen_ids:
                    seen_ids.add(i)
                    b = self.words[i]
                    if len(a & b) >= MIN_SHARED and jaccard(a, b) >= self.near:
                        return "near"
        return None


def seen_index(sets: Iterable[str], data_dir: str | None = None, near: float = NEAR_DUPLICATE) -> SeenIndex:
    return SeenIndex((p.instruction for name in sets for p in load_set(name, data_dir)), near)


@dataclass
class Exclusion:
    kept: list[Prompt]
    exact: int
    near: int

    def counts(self) -> dict:
        return {"kept": len(self.kept), "excluded_exact": self.exact, "excluded_near": self.near}


def exclude_seen(prompts: list[Prompt], index: SeenIndex | None) -> Exclusion:
    """The prompts that are neither an exact nor a near duplicate of a seen one, and how many went."""
    if index is None or not len(index):
        return Exclusion(list(prompts), 0, 0)
    kept, exact, near = [], 0, 0
    for p in prompts:
        m = index.match(p.instruction)
        if m == "exact":
            exact += 1
        elif m == "near":
            near += 1
        else:
            kept.append(p)
    return Exclusion(kept, exact, near)


@lru_cache(maxsize=4)
def _upstream(data_dir: str | None) -> dict[str, str]:
    out = {}
    for name in _UPSTREAM:
        for p in load_set(name, data_dir):
            out.setdefault(normalize(p.instruction), SET_ORIGIN[name])
    return out


def origin_of(set_name: str, prompt: Prompt, data_dir: str | None = None) -> str:
    """The upstream source family of one prompt of a named set (see the module's docstring)."""
    if prompt.origin:
        return prompt.origin
    if set_name in SET_ORIGIN:
        return SET_ORIGIN[set_name]
    if set_name in CATALOGUE and CATALOGUE[set_name].role in ("harmful", "benign"):
        return _upstream(data_dir).get(normalize(prompt.instruction), set_name)
    return set_name


def origins(set_names: Iterable[str], data_dir: str | None = None) -> set[str]:
    """Every origin the prompts of these sets have."""
    return {origin_of(n, p, data_dir) for n in set_names for p in load_set(n, data_dir)}
