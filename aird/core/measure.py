"""What a compression actually did, measured from the weights: sparsity, N:M compliance, distinct values per
quantization group, relative error against the original weights."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


class LazyTensors(Mapping):
    """The tensors of a safetensors file, each read only when asked for (and not kept): measuring a written
    model one matrix at a time instead of holding a second copy of it in memory."""

    def __init__(self, path: Path | str, keys: list[str] | None = None):
        from safetensors import safe_open

        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self._shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        self._keys = list(self._shapes) if keys is None else [k for k in keys if k in self._shapes]

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        from safetensors import safe_open

        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def dims(self, key: str) -> int:
        return len(self._shapes[key])

    def subset(self, keys: list[str]) -> "LazyTensors":
        view = LazyTensors.__new__(LazyTensors)
        view.path, view._shapes, view._keys = self.path, self._shapes, [k for k in keys if k in self._shapes]
        return view


def decoder_linear_weights(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The 2-D weight matrices inside the decoder layers (the Linear layers compression targets); lazy for a
    LazyTensors."""
    if isinstance(tensors, LazyTensors):
        return tensors.subset([k for k in tensors if k.endswith(".weight") and tensors.dims(k) == 2
                               and layer_of(k) is not None])
    return {k: v for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2 and layer_of(k) is not None}


def max_distinct_per_group(w: torch.Tensor, group_size: int | None, chunk_rows: int = 256) -> int:
    """Largest number of distinct values in any quantization group (a row, or ``group_size`` consecutive
    input weights of a row)."""
    w = w.float()
    rows, cols = w.shape
    g = cols if not group_size else group_size
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols}")
    best = 0
    for s in range(0, rows, chunk_rows):
        block = w[s : s + chunk_rows].reshape(-1, g).sort(dim=-1).values
        distinct = (block[:, 1:] != block[:, :-1]).sum(-1) + 1
        best = max(best, int(distinct.max()))
    return best


def nm_compliant(w: torch.Tensor, n: int, m: int) -> bool:
    """At most n non-zeros in every m consecutive weights along the input dimension."""
    rows, cols = w.shape
    if cols % m:
        return False
    return bool(((w.reshape(rows, cols // m, m) != 0).sum(-1) <= n).all())


def summarize(tensors: Mapping[str, torch.Tensor], original: Mapping[str, torch.Tensor] | None = None,
              group_size: int | None = None, nm: tuple[int, int] | None = None,
              bits: int | None = None) -> dict:
    """Achieved sparsity (exact zeros over all decoder Linear weights), per-layer sparsity and relative error,
    achieved bits (ceil log2 of the most distinct values in a group) and N:M compliance."""
    weights = decoder_linear_weights(tensors)
    zeros = total = 0
    per_layer: dict[int, dict] = {}
    max_distinct = 0
    compliant = True
    for name, w in weights.items():
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        lay = per_layer.setdefault(layer_of(name), {"zeros": 0, "total": 0, "err_num": 0.0, "err_den": 0.0, "matrices": {}})
        lay["zeros"] += z
        lay["total"] += w.numel()
        entry = {"sparsity": z / w.numel()}
        if original is not None and name in original:
            o = original[name].float()
            diff = (w.float() - o).norm().item() ** 2
            lay["err_num"] += diff
            lay["err_den"] += o.norm().item() ** 2
            entry["rel_error"] = math.sqrt(diff) / max(o.norm().item(), 1e-30)
        if bits is not None:
            d = max_distinct_per_group(w, group_size)
            entry["max_distinct"] = d
            max_distinct = max(max_distinct, d)
        if nm is not None:
            ok = nm_compliant(w, *nm)
            entry["nm_compliant"] = ok
            compliant &= ok
        lay["matrices"][name.split(f"layers.{layer_of(name)}.", 1)[1].removesuffix(".weight")] = entry
    rows = []
    for idx in sorted(per_layer):
        lay = per_layer[idx]
        rows.append({
            "layer": idx,
            "sparsity": lay["zeros"] / lay["total"],
            "rel_error": math.sqrt(lay["err_num"] / lay["err_den"]) if lay["err_den"] else None,
            "matrices": lay["matrices"],
        })
    other = {k: float((tensors[k] == 0).float().mean()) for k in tensors
             if k.endswith(".weight") and layer_of(k) is None
             and (tensors.dims(k) if isinstance(tensors, LazyTensors) else tensors[k].dim()) == 2}
    out = {
        "sparsity": zeros / total if total else 0.0,
        "n_weights": total,
        "per_layer": rows,
        "other_sparsity": other,   # embeddings, lm_head: compression must leave them dense
    }
    if bits is not None:
        out["max_distinct_per_group"] = max_distinct
        out["bits"] = math.ceil(math.log2(max_distinct)) if max_distinct > 1 else 1
    if nm is not None:
        out["nm_compliant"] = compliant
    return out
