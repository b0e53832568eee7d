"""How aird writes a value for a person (terminal tables and the study report alike)."""

from __future__ import annotations


def fmt(v, digits: int = 3) -> str:
    """None as a dash, booleans as yes/no, floats with ``digits`` decimals, anything else as text."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)
