"""Helpers shared by the tests that run aird as a user does: a subprocess, stdout piped, stderr read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_aird(*args, stdin: str | None = None, env: dict | None = None, path: Path | None = None,
             load_plugins: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m aird ARGS`` with the test environment (tests/conftest.py: hf engine, no third-party plugins);
    ``env`` adds variables, ``path`` puts a folder of installed test packages first on PYTHONPATH, and
    ``load_plugins`` lets the machine's third-party plugins (and those in ``path``) load."""
    full = {**os.environ, **(env or {})}
    if load_plugins or path is not None:
        full.pop("AIRD_LOAD_PLUGINS", None)
    if path is not None:
        full["PYTHONPATH"] = os.pathsep.join([str(path), full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "aird", *map(str, args)], capture_output=True, text=True,
                          input=stdin, env=full, timeout=timeout)
