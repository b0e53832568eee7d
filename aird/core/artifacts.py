"""Artifacts: JSONL records with a schema version and run metadata, tensors in safetensors beside them.

Every write goes to a temporary file first and is renamed into place, so a killed run never leaves half a
file; a rerun reads what is there and resumes. Nothing is overwritten without ``force``.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aird.core.env import versions
from aird.core.errors import ArtifactError, DiskFull

SCHEMA_VERSION = 1


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors take on disk, a storage shared by several (tied weights) counted once."""
    return sum(v.numel() * v.element_size() for v in {v.data_ptr(): v for v in tensors}.values())


def require_free_space(folder: Path, nbytes: int, what: str) -> None:
    """Fail before a long run, in one sentence, when ``folder``'s file system cannot hold ``nbytes`` more."""
    where = _existing(folder)
    free = shutil.disk_usage(where).free
    if free < nbytes * 1.02 + 64 * 2**20:
        raise DiskFull(f"not enough free disk space for {what}: it needs about {_gb(nbytes)} at {where} "
                       f"and {_gb(free)} are free.")


@contextmanager
def disk_full_as_error(what: str, cleanup: Path | None = None):
    """Turn 'no space left on device' while writing into one sentence, removing the half-written ``cleanup``."""
    try:
        yield
    except Exception as exc:  # safetensors reports it as SafetensorError, not OSError
        full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(exc)
        if not full:
            raise
        if cleanup is not None and Path(cleanup).is_dir():
            shutil.rmtree(cleanup, ignore_errors=True)
        elif cleanup is not None:
            Path(cleanup).unlink(missing_ok=True)
        raise DiskFull(f"the disk filled up while writing {what}; free some space and rerun the same command.") from None


def _tmp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        with disk_full_as_error(str(path)), open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def dumps(record: dict) -> str:
    return json.dumps(record, default=_json_default, ensure_ascii=False)


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialize {type(o).__name__}")


def write_jsonl(path: Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(dumps(r) + "\n" for r in records))


def read_jsonl(path: Path | str, torn_tail_ok: bool = False) -> list[dict]:
    """Read records; a line that is not JSON is an error, except, with ``torn_tail_ok``, a last line without
    its newline (what a run killed mid-append leaves in a streamed file): it is dropped."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist.")
    out = []
    # bytes first: a kill in the middle of a multi-byte character (an emoji, a Chinese answer) leaves a last
    # line that is not even UTF-8, and that is still only a torn tail
    lines = path.read_bytes().splitlines(keepends=True)
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            if torn_tail_ok and i == len(lines) and not raw.endswith(b"\n"):
                break
            raise ArtifactError(f"{path} line {i} is not valid JSON; delete the file or rerun with --force.") from None
        if not isinstance(rec, dict) or "record" not in rec:
            raise ArtifactError(f"{path} line {i} is not an aird record; delete the file or rerun with --force.")
        out.append(rec)
    return out


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append records to a streamed JSONL file, flushed to disk before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_full_as_error(str(path)), open(path, "a", encoding="utf-8") as fh:
        fh.write("".join(dumps(r) + "\n" for r in records))
        fh.flush()
        os.fsync(fh.fileno())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_beside(path)
    try:
        with disk_full_as_error(str(path)):
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}).") from None


@dataclass
class Run:
    """Metadata that every record of one run carries."""

    kind: str                    # "probe", "compress", ...
    model: str
    config: dict
    seed: int
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)

    def record(self, record: str, **payload: Any) -> dict:
        return {
            "record": record,
            "schema": SCHEMA_VERSION,
            "model": self.model,
            "config": self.config,
            "seed": self.seed,
            "versions": versions(),
            **payload,
        }


class Stopwatch:
    """Accumulates wall time per stage into a dict: ``with sw("activations"): ...``."""

    def __init__(self, into: dict[str, float]):
        self.into = into

    def __call__(self, stage: str):
        sw = self

        class _Ctx:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                sw.into[stage] = round(sw.into.get(stage, 0.0) + time.perf_counter() - self.t, 3)

        return _Ctx()


def check_resumable(records: list[dict], config: dict, path: Path, ignore: tuple[str, ...] = ()) -> None:
    """A rerun may reuse records only when they came from the same configuration."""
    for rec in records:
        old = {k: v for k, v in (rec.get("config") or {}).items() if k not in ignore}
        new = {k: v for k, v in config.items() if k not in ignore}
        if rec.get("schema") != SCHEMA_VERSION:
            raise ArtifactError(f"{path} was written by another aird schema ({rec.get('schema')}); rerun with --force.")
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ArtifactError(
                f"{path} holds a run with a different configuration ({', '.join(diff)}); "
                "use another --out or rerun with --force."
            )


def finished_model_folder(out: Path, jsonl_name: str, summary_record: str, config: dict, force: bool,
                          ignore: tuple[str, ...] = ()) -> dict | None:
    """For commands that write a model folder (compress, repair): the summary of a finished run with the same
    configuration in ``out`` (to reuse), else None; refuses to replace anything that is not an aird model
    folder, and an existing model without ``force``."""
    jsonl = out / jsonl_name
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not jsonl.exists()
                         and not (out / "config.json").exists()):
        raise ArtifactError(f"{out} exists and is not a model folder; aird will not replace it, choose another --out.")
    if jsonl.exists() and not force:
        records = read_jsonl(jsonl)
        check_resumable(records, config, jsonl, ignore=ignore)
        done = next((r for r in records if r["record"] == summary_record), None)
        if done is not None and (out / "config.json").is_file():
            return done
    elif (out / "config.json").exists() and not force:
        raise ArtifactError(f"{out} already holds a model; use --force to replace it or choose another --out.")
    return None
