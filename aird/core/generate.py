"""Batched greedy generation: length-sorted batches, left padding, the KV cache, first-step logits kept."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aird.core.forward import make_batches
from aird.core.loading import LoadedModel


@dataclass
class Generation:
    text: str
    first_logits: torch.Tensor | None   # [V], logits of the first generated position (None: engine keeps none)
    n_new_tokens: int
    first_logprobs: dict[int, float] | None = None   # the engine's top log-probabilities at the first position


def generate(lm: LoadedModel, texts: list[str], max_new_tokens: int = 64, batch_size: int = 16,
             progress=None) -> list[Generation]:
    """Greedy completions of chat-formatted ``texts`` (in the caller's order)."""
    tok = lm.tokenizer
    eos = lm.model.generation_config.eos_token_id if lm.model.generation_config is not None else None
    out: list[Generation | None] = [None] * len(texts)
    with torch.inference_mode():
        for b in make_batches(lm, texts, batch_size):
            res = lm.model.generate(
                input_ids=b.input_ids, attention_mask=b.attention_mask, max_new_tokens=max_new_tokens,
                do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id,
                eos_token_id=eos, return_dict_in_generate=True, output_logits=True, use_cache=True,
            )
            new = res.sequences[:, b.input_ids.shape[1]:]
            first = res.logits[0].float().cpu()
            for row, i in enumerate(b.idx):
                ids = new[row].tolist()
                stop = {tok.pad_token_id} | (set(eos) if isinstance(eos, list) else {eos} if eos is not None else set())
                n = next((k for k, t in enumerate(ids) if t in stop), len(ids))
                out[i] = Generation(tok.decode(ids[:n], skip_special_tokens=True), first[row], n)
            if progress:
                progress(len(b.idx))
    return out  # type: ignore[return-value]


class BatchedSession:
    """The ``hf`` engine's session: ``generate`` above on the loaded model (what aird used before engines)."""

    chunk = 64

    def __init__(self, lm: LoadedModel, batch_size: int = 16):
        self.lm = lm
        self.batch_size = batch_size
        self.info = {"engine": "hf", "dtype": lm.info.get("dtype"), "device": str(lm.device), "startup_s": 0.0}

    def generate(self, texts: list[str], max_new_tokens: int, progress=None) -> list[Generation]:
        return generate(self.lm, texts, max_new_tokens, self.batch_size, progress=progress)

    def close(self) -> None:
        pass
