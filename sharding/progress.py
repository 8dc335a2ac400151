"""A rich progress bar for images with their rate and ETA (quiet when disabled or not on a terminal)."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

console = Console(stderr=True)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed:,.0f} img/s" if task.speed else "- img/s", style="cyan")


class ImageProgress:
    """Context manager wrapping an iterator of per-image results."""

    def __init__(self, total: int, enabled: bool = True):
        self._progress = Progress(TextColumn("[bold]sharding"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                  console=console, disable=not enabled or total == 0)
        self._task = self._progress.add_task("images", total=total)

    def __enter__(self) -> "ImageProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.__exit__(*exc)

    def track(self, results: Iterable, weight: Callable[[object], int] = lambda r: 1) -> Iterator:
        """Pass results through, advancing by `weight(result)` images each."""
        for r in results:
            self._progress.advance(self._task, weight(r))
            yield r
