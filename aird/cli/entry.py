"""The process entry of `aird` and `python -m aird`: a SIGTERM that arrives while the CLI is still importing (torch,
transformers: seconds) ends the process like one that arrives later, with exit 143, instead of the default death
by signal; the CLI's own handler (aird/core/reliability.py) takes over once a command runs."""

from __future__ import annotations

import signal


def _terminated_while_starting(signum, frame):
    raise SystemExit(143)     # nothing has been written yet: there is nothing to clean up


def main() -> None:
    signal.signal(signal.SIGTERM, _terminated_while_starting)
    from aird.cli.main import main as cli_main

    try:
        cli_main()
    finally:
        # the command has ended, its writes finished or unwound, its exit code decided: a SIGTERM during the
        # interpreter's teardown (torch's takes a moment), after Python has put back the default handler, would
        # kill the process by signal (-15) instead of letting it exit with that code. CPython leaves an ignored
        # signal ignored through its teardown.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
