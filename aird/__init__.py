"""aird: did compression break a chat model's refusal direction, and can a rank-one edit repair it?"""

__version__ = "0.1.0"

from aird.core.hookspecs import hookimpl  # noqa: E402  (what plugins decorate their hooks with)

__all__ = ["__version__", "hookimpl"]
