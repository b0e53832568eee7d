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


def test_study_default_toml_is_in_sync_and_is_the_full_profile():

    from aird.core.study import resolve_config, section_keys

    root = DOCS.parent
    mod = runpy.run_path(str(root / "scripts" / "study_toml.py"))
    path = root / "aird" / "study.default.toml"
    assert path.read_text() == mod["render"](), "aird/study.default.toml is stale: run python scripts/study_toml.py"
    assert resolve_config("full", path) == resolve_config("full")   # its active lines are the full profile
    text = path.read_text()
    for section, known in section_keys().items():   # every key a section takes is documented, once
        body = text.split(f"[{section}]", 1)[1].split("\n[", 1)[0]
        keys = [ln.split(" (", 1)[0][2:] for ln in body.splitlines() if ln.startswith("# ") and " (" in ln]
        assert sorted(keys) == sorted(known), section
