"""How the core reports progress without knowing about terminals: the CLI passes a Reporter."""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator


class Reporter:
    """No-op reporter; the CLI subclasses it with rich progress bars on stderr."""

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A stage of ``total`` units; yields ``advance(n=1, description=None)``. Stages may nest."""
        yield lambda n=1, description=None: None

    def note(self, message: str) -> None:
        pass


_CURRENT: ContextVar["Reporter | None"] = ContextVar("aird_reporter", default=None)


def current() -> Reporter:
    """The reporter of the command running now (set around plugin calls, which take none), or a no-op one: so
    a long step inside a plugin (the refusal saliency of a protected compressor) gets its own progress bar."""
    return _CURRENT.get() or Reporter()


@contextmanager
def reporting(rep: Reporter) -> Iterator[None]:
    """Make ``rep`` the :func:`current` reporter for the length of the block."""
    token = _CURRENT.set(rep)
    try:
        yield
    finally:
        _CURRENT.reset(token)
