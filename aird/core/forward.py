"""Batched forward passes: left padding, length-sorted batches, last-position logits only."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from aird.core.loading import LoadedModel


@dataclass
class Batch:
    idx: list[int]                 # positions of these rows in the caller's list
    input_ids: torch.Tensor        # [B, T], left padded
    attention_mask: torch.Tensor   # [B, T]
    position_ids: torch.Tensor     # [B, T], counting from the first real token

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def make_batches(lm: LoadedModel, texts: list[str], batch_size: int) -> list[Batch]:
    """Tokenize chat-formatted texts and group them by length so that little padding is wasted."""
    tok = lm.tokenizer
    return batches_of_ids(lm, [tok(t, add_special_tokens=False)["input_ids"] for t in texts], batch_size)


def batches_of_ids(lm: LoadedModel, ids: list[list[int]], batch_size: int) -> list[Batch]:
    """Left-padded, length-sorted batches of token id lists (``make_batches`` without the tokenizing)."""
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = lm.tokenizer.pad_token_id
    batches = []
    for s in range(0, len(order), max(1, batch_size)):
        chunk = order[s : s + batch_size]
        width = max(len(ids[i]) for i in chunk)
        inp = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, i in enumerate(chunk):
            n = len(ids[i])
            inp[r, width - n :] = torch.tensor(ids[i], dtype=torch.long)
            mask[r, width - n :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        batches.append(Batch(chunk, inp.to(lm.device), mask.to(lm.device), pos.to(lm.device)))
    return batches


def run_model(lm: LoadedModel, batch: Batch, keep_last: int = 1) -> torch.Tensor:
    """Logits of the last ``keep_last`` positions, float32, [B, keep_last, V]."""
    out = lm.model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        logits_to_keep=keep_last,
    )
    return out.logits.float()


def last_logits(
    lm: LoadedModel,
    batches: list[Batch],
    context: Callable[[Batch], object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Last-position logits for every row, in the caller's order. ``context(batch)`` wraps each pass
    (a hook context manager) when given."""
    n = sum(len(b.idx) for b in batches)
    result: torch.Tensor | None = None
    with torch.inference_mode():
        for b in batches:
            with (context(b) if context else nullcontext()):
                logits = run_model(lm, b)[:, -1, :]
            if result is None:
                result = torch.empty((n, logits.shape[-1]), dtype=torch.float32)
            result[b.idx] = logits.cpu()
            if progress:
                progress(len(b.idx))
    assert result is not None
    return result


def total_rows(batches: Iterable[Batch]) -> int:
    return sum(len(b.idx) for b in batches)
