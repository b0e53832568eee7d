"""A judge that reads a model's activations: a logistic regression over the mean hidden state of the reply.

A featurizer model (aird's default, Qwen2.5-Coder-0.5B-Instruct) reads the chat ``prompt -> reply`` once
(prefill only, no generation); the feature of a (prompt, reply) pair is the mean residual stream at the input of
one layer over the reply's first ``max_answer_tokens`` tokens. The forward pass stops at that layer, so a
verdict costs a fraction of one prefill. A logistic regression on those features, trained on human labels,
decides "refusal".

The weights ship with aird (``aird/data/judges/``, written by ``scripts/train_judge_classifier.py``): one
classifier fitted on every labelled row, used to judge, and one per held-out cell of a cross-fit (answering model
× prompt fold), so that ``aird judges validate`` scores every labelled row with a classifier that saw neither its
answering model nor its prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from aird.core.errors import AirdError
from aird.core.forward import batches_of_ids
from aird.core.hooks import capture_resid, forward_until, stop_before

FOLDS = 5
PROMPT_CHARS = 600        # longer prompts keep their first and last 300 characters: a jailbreak's request often ends it


def prompt_fold(prompt: str, folds: int = FOLDS) -> int:
    """A stable fold of a prompt (same text, same fold, on every machine)."""
    return int(hashlib.sha256(prompt.encode("utf-8")).hexdigest(), 16) % folds


def _short(prompt: str) -> str:
    if len(prompt) <= PROMPT_CHARS:
        return prompt
    half = PROMPT_CHARS // 2
    return prompt[:half] + " … " + prompt[-half:]


def answer_features(lm, prompts: list[str], completions: list[str], layers: list[int], max_answer_tokens: int = 48,
                    batch_size: int = 16, progress=None) -> dict[int, torch.Tensor]:
    """``{layer: [N, d]}``: the mean resid_pre of each layer over the reply's first ``max_answer_tokens`` tokens,
    in the caller's order (float32, on the CPU). An empty reply is read as one token of nothing: its feature is the
    state at the end of the prompt's chat turn."""
    adapter, tokenizer = lm.adapter, lm.tokenizer
    rows = []
    for p, c in zip(prompts, completions):
        head = tokenizer(adapter.format(tokenizer, _short(p), system=""), add_special_tokens=False)["input_ids"]
        ans = tokenizer(c, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        rows.append((head, ans))
    blocks = adapter.layers(lm.model)
    if not layers or max(layers) >= len(blocks) or min(layers) < 0:
        raise AirdError(f"feature layers {layers} are not layers of a {len(blocks)}-layer model.")
    out = {layer: torch.empty((len(rows), lm.model.config.hidden_size)) for layer in layers}
    store: dict[int, torch.Tensor] = {}

    # the stop comes after capture_resid's hooks: the deepest layer's input is stored, then the pass ends
    with torch.inference_mode(), capture_resid(lm, store, None, layers), stop_before(lm, max(layers)):
        for b in batches_of_ids(lm, [head + ans for head, ans in rows], batch_size):
            width = b.input_ids.shape[1]
            sel = torch.zeros((len(b.idx), width))     # the mean over each row's reply tokens (left padded)
            for r, i in enumerate(b.idx):
                n_ans = max(1, len(rows[i][1]))
                sel[r, width - n_ans:] = 1.0 / n_ans
            forward_until(lm, b)
            for layer in layers:
                out[layer][b.idx] = torch.einsum("bt,btd->bd", sel, store[layer].float().cpu())
            if progress:
                progress(len(b.idx))
    return out


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int = 200) -> tuple[torch.Tensor, float]:
    """L2-regularised logistic regression on standardised features, returned on the raw features
    (``w``, ``b``: P(refusal) = σ(x·w + b)). ``l2`` multiplies the mean squared weight."""
    x = x.double()
    y = y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    return w_raw.float(), float(b.detach() - (w.detach() * mu / sd).sum())


@dataclass
class ClassifierWeights:
    """What the judge needs: the featurizer, the layer, and the classifiers (``"all"`` and cross-fit cells)."""

    featurizer: str
    layer: int
    max_answer_tokens: int
    classifiers: dict[str, tuple[torch.Tensor, float]]
    meta: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from aird.core.artifacts import save_tensors

        meta = {"featurizer": self.featurizer, "layer": self.layer, "max_answer_tokens": self.max_answer_tokens,
                "bias": {k: b for k, (_, b) in self.classifiers.items()}, **self.meta}
        save_tensors(Path(path), {f"w.{k}": w for k, (w, _) in self.classifiers.items()},
                     metadata={"aird": json.dumps(meta)})

    @classmethod
    def load(cls, path: Path) -> "ClassifierWeights":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["aird"])
                ws = {k[2:]: f.get_tensor(k) for k in f.keys() if k.startswith("w.")}
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise AirdError(f"cannot read the judge classifier {path}: {exc}") from None
        bias = meta.pop("bias")
        return cls(meta.pop("featurizer"), int(meta.pop("layer")), int(meta.pop("max_answer_tokens")),
                   {k: (w, float(bias[k])) for k, w in ws.items()}, meta)

    def probability(self, feats: torch.Tensor, key: str = "all") -> torch.Tensor:
        w, b = self.classifiers[key]
        return torch.sigmoid(feats.float() @ w + b)


def cell_key(group: str, fold: int) -> str:
    return f"{group}/{fold}"


def cross_fit(feats: torch.Tensor, labels: list[bool], groups: list[str], prompts: list[str], l2: float
              ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, float]]]:
    """Held-out P(refusal) for every row, each from a classifier fitted on the rows of the other answering
    models *and* the other prompt folds; and those classifiers, keyed ``group/fold``."""
    y = torch.tensor(labels, dtype=torch.float64)
    folds = [prompt_fold(p) for p in prompts]
    probs = torch.empty(len(labels))
    fitted = {}
    for g in sorted(set(groups)):
        for f in range(FOLDS):
            test = [i for i in range(len(labels)) if groups[i] == g and folds[i] == f]
            if not test:
                continue
            train = [i for i in range(len(labels)) if groups[i] != g and folds[i] != f]
            w, b = fit_logistic(feats[train], y[train], l2)
            fitted[cell_key(g, f)] = (w, b)
            probs[test] = torch.sigmoid(feats[test].float() @ w + b)
    return probs, fitted
