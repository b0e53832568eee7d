#!/usr/bin/env python3
"""Rebuild aird's bundled data (aird/data/) from a data directory laid out like the shared one.

    python3 scripts/bundle_data.py SOURCE_DIR

Every file of ``aird.core.data.CATALOGUE`` is copied byte for byte and gzip-compressed (level 9, no name, mtime
0, so the same input gives the same bytes). Licenses and aird/data/SOURCES.md are kept by hand. Checks each set's
row count against the catalogue after writing.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aird.core import data  # noqa: E402


def main(src: Path) -> int:
    relpaths = sorted({d.relpath for d in data.CATALOGUE.values()})
    total = 0
    for rel in relpaths:
        raw = (src / rel).read_bytes()
        dest = data.PACKAGE_DATA / (rel + ".gz")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_suffix(".gz.tmp")
        with open(tmp, "wb") as fh, gzip.GzipFile(filename="", mode="wb", fileobj=fh, mtime=0, compresslevel=9) as gz:
            gz.write(raw)
        tmp.replace(dest)
        total += dest.stat().st_size
        print(f"{rel}: {len(raw):,} -> {dest.stat().st_size:,} bytes")
    bad = [(d.name, d.rows, data.count_rows(d.name, None)) for d in data.CATALOGUE.values()]
    bad = [b for b in bad if b[1] != b[2]]
    for name, documented, found in bad:
        print(f"row count of {name}: catalogue says {documented}, the bundled file holds {found}", file=sys.stderr)
    print(f"{len(relpaths)} files, {total:,} bytes compressed")
    return 1 if bad else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
