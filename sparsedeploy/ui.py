"""Everything the user sees while a command runs: one stderr console and progress bars.

stdout is reserved for results (`--json` prints exactly one document there).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

T = TypeVar("T")

stderr = Console(stderr=True)


def progress_iter(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate with a progress bar on stderr (a no-op bar when stderr is not a terminal)."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal) as bar:
        yield from bar.track(items, total=total, description=description)


def info(message: str) -> None:
    stderr.print(escape(message), highlight=False, soft_wrap=True)  # plain text: "[build]" is no markup
