"""How long-running library work reports progress without printing.

Library code calls these hooks; the CLI passes an implementation that draws progress bars.
"""

from __future__ import annotations

from typing import Any, Protocol


class Progress(Protocol):
    def start(self, n_slides: int) -> None: ...
    def slide_started(self, slide_id: str, n_tiles: int) -> None: ...
    def tiles_done(self, n_tiles: int) -> None: ...
    def slide_done(self, result: Any) -> None: ...
    def finish(self) -> None: ...


class NullProgress:
    """Reports nothing (the default for library calls)."""

    def start(self, n_slides: int) -> None:
        pass

    def slide_started(self, slide_id: str, n_tiles: int) -> None:
        pass

    def tiles_done(self, n_tiles: int) -> None:
        pass

    def slide_done(self, result: Any) -> None:
        pass

    def finish(self) -> None:
        pass
