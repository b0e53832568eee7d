"""How the core reports progress without knowing about terminals: the CLI passes a Reporter."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator


class Reporter:
    """No-op reporter; the CLI subclasses it with rich progress bars on stderr."""

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """A stage of ``total`` units; yields ``advance(n=1, description=None)``. Stages may nest."""
        yield lambda n=1, description=None: None

    def note(self, message: str) -> None:
        pass
