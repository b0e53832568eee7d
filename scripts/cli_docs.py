"""Write docs/cli.md: every subcommand's --help, as aird prints it (a test keeps the file in sync).

    python scripts/cli_docs.py            # rewrite docs/cli.md
    python scripts/cli_docs.py --check    # exit 1 when docs/cli.md is out of date
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from typer.main import get_command

from aird.cli.main import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
COMMANDS = [[], ["plugins"], ["models"], ["models", "install"], ["data"], ["probe"], ["compress"], ["diff"],
            ["repair"], ["eval"], ["judges", "validate"], ["study"]]


def help_text(args: list[str]) -> str:
    res = CliRunner().invoke(get_command(app), [*args, "--help"], prog_name="aird", terminal_width=100,
                             color=False)
    assert res.exit_code == 0, res.output
    return res.output.rstrip() + "\n"


def render() -> str:
    out = ["# Command-line reference", "",
           "Generated from `aird COMMAND --help` by `python scripts/cli_docs.py`; `tests/test_cli_docs.py` fails when "
           "it is out of date. What each command is for, with examples: the page of each subcommand under docs/.", ""]
    for args in COMMANDS:
        out += [f"## `aird {' '.join(args)}`".replace("aird `", "aird`") if args else "## `aird`", "", "```text",
                help_text(args).rstrip(), "```", ""]
    return "\n".join(out)


if __name__ == "__main__":
    from docsync import write_or_check   # beside this script

    write_or_check(DOC, render())
