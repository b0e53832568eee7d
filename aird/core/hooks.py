"""Reading and steering the residual stream with forward hooks.

In transformers 5.x a decoder layer receives the residual stream positionally (args[0]) and returns it as a
plain tensor; an attention block returns (output, weights). A pre-hook on layer i sees the residual at the
input of layer i ("resid_pre").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from aird.core.loading import LoadedModel

Edit = Callable[[torch.Tensor], torch.Tensor]


def _edit_pre(fn: Edit):
    def hook(module, args, kwargs):
        if args:
            return (fn(args[0]),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = fn(kwargs["hidden_states"])
        return args, kwargs

    return hook


def _edit_out(fn: Edit):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (fn(output[0]),) + tuple(output[1:])
        return fn(output)

    return hook


@contextmanager
def _registered(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x − r̂ r̂ᵀ x along the last dimension."""
    return x - (x @ unit).unsqueeze(-1) * unit


def unit(direction: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    r = direction.double()
    r = r / r.norm()
    return r.to(dtype=like.dtype, device=like.device) if like is not None else r.float()


def _cast(v: torch.Tensor, lm: LoadedModel) -> torch.Tensor:
    p = next(lm.model.parameters())
    return v.to(device=p.device, dtype=p.dtype)


@contextmanager
def ablate(lm: LoadedModel, direction: torch.Tensor) -> Iterator[None]:
    """Directional ablation everywhere: remove r̂ from every block input and every block output written to
    the residual stream (the reference pipeline's intervention)."""
    r = _cast(unit(direction), lm)
    fn = lambda x: project_out(x, r)  # noqa: E731
    handles = []
    for layer in lm.adapter.layers(lm.model):
        handles.append(layer.register_forward_pre_hook(_edit_pre(fn), with_kwargs=True))
        handles.append(lm.adapter.attn_writer(layer).register_forward_hook(_edit_out(fn)))
        handles.append(lm.adapter.mlp_writer(layer).register_forward_hook(_edit_out(fn)))
    with _registered(handles):
        yield


@contextmanager
def add(lm: LoadedModel, direction: torch.Tensor, layer: int, coeff: float = 1.0) -> Iterator[None]:
    """Activation addition: x ← x + coeff · r at the input of ``layer``, every position."""
    r = _cast(direction, lm) * coeff
    block = lm.adapter.layers(lm.model)[layer]
    with _registered([block.register_forward_pre_hook(_edit_pre(lambda x: x + r), with_kwargs=True)]):
        yield


@contextmanager
def capture_resid(lm: LoadedModel, store: dict[int, torch.Tensor], positions: list[int] | None,
                  layers: list[int] | None = None) -> Iterator[None]:
    """Record resid_pre of each layer into ``store[layer]`` ([B, P, d], or [B, T, d] when positions is None)."""
    blocks = lm.adapter.layers(lm.model)
    wanted = range(len(blocks)) if layers is None else layers
    handles = []
    for i in wanted:
        def hook(module, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            store[i] = (x[:, positions, :] if positions is not None else x).detach().clone()
        handles.append(blocks[i].register_forward_pre_hook(hook, with_kwargs=True))
    with _registered(handles):
        yield


class StopForward(Exception):
    """Raised by the hook of :func:`stop_before` once the forward pass reaches its layer."""


def _stop(module, args, kwargs):
    raise StopForward


@contextmanager
def stop_before(lm: LoadedModel, layer: int) -> Iterator[None]:
    """Every forward pass stops at the input of ``layer``: the layers above it, the final norm and the logits
    are not computed. Enter it after the hooks that read that input (pre-hooks run in the order they were
    registered) and run the model with :func:`forward_until`."""
    with _registered([lm.adapter.layers(lm.model)[layer].register_forward_pre_hook(_stop, with_kwargs=True)]):
        yield


def forward_until(lm: LoadedModel, batch) -> None:
    """One forward pass of a batch (aird.core.forward.Batch) under :func:`stop_before`."""
    try:
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                 use_cache=False, logits_to_keep=1)
    except StopForward:
        pass


class _Skip(nn.Module):
    """Stands in for a decoder layer whose output is already known (returns its input unchanged)."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextmanager
def start_at(lm: LoadedModel, layer: int, resid: torch.Tensor) -> Iterator[None]:
    """Run the model from ``layer`` on: layers below it are skipped and the input of ``layer`` is replaced by
    the cached ``resid`` ([B, T, d] for the current batch). The model's own forward still builds the masks
    and rotary embeddings, so this works for every family without re-implementing them."""
    blocks = lm.adapter.layers(lm.model)
    saved = [blocks[i] for i in range(layer)]
    for i in range(layer):
        blocks[i] = _Skip()
    handle = blocks[layer].register_forward_pre_hook(_edit_pre(lambda x: resid.to(x.dtype)), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, mod in enumerate(saved):
            blocks[i] = mod
