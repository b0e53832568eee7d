"""What a study knows of each model, and what it returns: the types that the study (aird/core/study.py) fills
and the report (aird/core/report.py) reads, in a module of their own so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Entry:
    """One model of the study and what is known of it."""

    name: str
    role: str                        # original | compressed | repaired
    folder: Path
    model_path: str
    parent: str | None = None        # the compressed entry a repaired one came from
    method: str | None = None
    kind: str | None = None          # pruning | quantization | repair
    compress: dict | None = None
    repair: dict | None = None
    probe: dict | None = None
    diff: dict | None = None
    eval: dict | None = None

    @property
    def eval_dir(self) -> Path:
        """Where the study evaluates this model (eval.jsonl and its plots)."""
        return Path(self.folder) / "eval"


@dataclass
class StudyResult:
    out: Path
    config: dict
    entries: list[Entry]
    steps: list[dict] = field(default_factory=list)
    report: Path | None = None
    findings: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    pending: list[str] = field(default_factory=list)   # models not finished yet (a report-only result)
