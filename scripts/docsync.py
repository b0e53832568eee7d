"""The command line of the generated-file scripts (cli_docs.py, study_toml.py): write the file, or with
--check exit 1 when it is out of date."""

from __future__ import annotations

import sys
from pathlib import Path


def write_or_check(path: Path, text: str) -> None:
    if "--check" in sys.argv:
        sys.exit(0 if path.is_file() and path.read_text() == text else 1)
    path.write_text(text)
    print(f"wrote {path}")
