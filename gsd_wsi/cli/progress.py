"""Rich progress bars for the CLI (the library reports through `gsd_wsi.progress.Progress`)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.text import Text


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``812 tiles/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        if task.fields.get("unit") != self.unit:
            return Text("")
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f} {self.unit}/s", style="progress.data.speed")


class TileProgressBars:
    """Two bars: slides finished, and tiles (or windows) done; that total grows as slides are planned."""

    def __init__(self, console: Console, unit: str = "tiles") -> None:
        self._bars = RichProgress(
            TextColumn("{task.description:>7}"), BarColumn(), MofNCompleteColumn(), RateColumn(unit),
            TimeElapsedColumn(), TextColumn("{task.fields[note]}"), console=console, transient=False,
        )
        self._slides = self._bars.add_task("slides", total=0, note="", unit="slides", start=False)
        self._tiles = self._bars.add_task(unit, total=0, note="", unit=unit, start=False)

    def start(self, n_slides: int) -> None:
        self._bars.start()
        self._bars.update(self._slides, total=n_slides)
        self._bars.start_task(self._slides)
        self._bars.start_task(self._tiles)

    def slide_started(self, slide_id: str, n_tiles: int) -> None:
        total = (self._bars.tasks[self._tiles].total or 0) + n_tiles
        self._bars.update(self._tiles, total=total, note=slide_id)

    def tiles_done(self, n_tiles: int) -> None:
        self._bars.advance(self._tiles, n_tiles)

    def slide_done(self, result: Any) -> None:
        self._bars.advance(self._slides, 1)

    def finish(self) -> None:
        self._bars.update(self._tiles, note="")
        self._bars.stop()


class TrainProgressBars:
    """One bar for training steps, with the latest loss and images per second.

    A plain class (no arguments) so that spawned training processes can build it.
    """

    def __init__(self) -> None:
        self._bars = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=Console(stderr=True),
        )
        self._task = self._bars.add_task("steps", total=0, loss="-", rate="", start=False)

    def start(self, total_steps: int, first_step: int) -> None:
        self._bars.start()
        self._bars.update(self._task, total=total_steps, completed=first_step)
        self._bars.start_task(self._task)

    def update(self, step: int, loss: float, img_per_s: float) -> None:
        self._bars.update(self._task, completed=step, loss=f"{loss:.4f}", rate=f"{img_per_s:.1f} img/s")

    def finish(self) -> None:
        self._bars.stop()


class ImageProgressBar:
    """One bar for images scored, with images per second; called as ``bar(done, total, name)``."""

    def __init__(self, console: Console) -> None:
        self._bars = RichProgress(
            TextColumn("images"), BarColumn(), MofNCompleteColumn(), RateColumn("images"), TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"), console=console, transient=False,
        )
        self._task = self._bars.add_task("images", total=None, note="", unit="images")

    def __enter__(self) -> ImageProgressBar:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.update(self._task, note="")
        self._bars.stop()

    def __call__(self, done: int, total: int, name: str) -> None:
        self._bars.update(self._task, completed=done, total=total, note=name)


class CohortProgressBar:
    """One bar over slides with the counts so far and slides per hour."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._bars = RichProgress(
            TextColumn("slides"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[counts]}"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False,
        )
        self._task = self._bars.add_task("slides", total=0, counts="", rate="", start=False)
        self._counts = {"done": 0, "skipped": 0, "no_tissue": 0, "failed": 0}
        self._worked = 0

    def start(self, n_slides: int, dashboard: str | None) -> None:
        if dashboard:
            self.console.print(f"dask dashboard: {dashboard}", highlight=False)
        self._bars.start()
        self._bars.update(self._task, total=n_slides)
        self._bars.start_task(self._task)

    def stage_done(self, record: Any) -> None:
        pass  # failures are logged as they come; the bar counts whole slides

    def slide_done(self, outcome: Any) -> None:
        self._counts[outcome.status] = self._counts.get(outcome.status, 0) + 1
        self._worked += outcome.status != "skipped"
        elapsed = self._bars.tasks[self._task].elapsed or 0.0
        rate = f"{self._worked / elapsed * 3600:,.0f} slides/h" if elapsed > 0 and self._worked else ""
        counts = " ".join(f"{k.replace('_', ' ')} {v}" for k, v in self._counts.items() if v)
        self._bars.update(self._task, advance=1, counts=counts, rate=rate)

    def finish(self) -> None:
        self._bars.stop()
