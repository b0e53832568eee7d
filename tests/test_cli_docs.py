"""docs/cli.md is every subcommand's --help as aird prints it: regenerate it with `python scripts/cli_docs.py`."""

import runpy
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_cli_reference_is_in_sync_with_the_help():
    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "cli_docs.py"))
    assert (DOCS / "cli.md").read_text() == mod["render"](), "docs/cli.md is stale: run python scripts/cli_docs.py"


def test_every_subcommand_has_a_page_or_a_section():
    readme = (DOCS.parent / "README.md").read_text()
    for page in ("probe", "compress", "diff", "repair", "eval", "study", "plugins", "models-and-data", "results",
                 "reliability", "artifacts", "cli"):
        assert (DOCS / f"{page}.md").is_file(), page
        assert f"docs/{page}.md" in readme, page
