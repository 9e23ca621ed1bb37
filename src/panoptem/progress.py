"""One progress-and-cancel mechanism for every long job.

Long work (batch and tiled inference, 3D stacks, training, downloads) takes an optional
``progress`` argument: a :class:`Progress` object. The job announces each stage with
:meth:`Progress.stage` (a name and how many steps it has), calls :meth:`Progress.advance`
after every step (slice, tile, image, iteration) and, through ``advance``, stops with
:class:`~panoptem.errors.Cancelled` as soon as :meth:`Progress.cancel` was called from any
thread. The command line shows it as a text bar (:class:`TextProgress`); the napari widgets
turn the same calls into a napari progress bar.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from panoptem.errors import Cancelled

__all__ = ["Progress", "TextProgress", "CallbackProgress", "ensure_progress"]


class Progress:
    """Receives progress from a job and carries a cancel request to it.

    The base class only counts; subclasses show it. It is safe to call :meth:`cancel`
    from another thread (a GUI button) while the job runs.
    """

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self.stage_name = ""
        self.total = 0
        self.done = 0
        self.note_text = ""

    # -- called by the job -----------------------------------------------------------
    def stage(self, name: str, total: int) -> None:
        """Start a new stage with ``total`` steps (0 when the count is unknown)."""
        self.check()
        self.stage_name, self.total, self.done, self.note_text = name, int(total), 0, ""
        self.on_stage(name, self.total)

    def note(self, text: str) -> None:
        """A short live read-out of the current stage, e.g. ``"loss 0.412"`` while training."""
        self.note_text = str(text)
        self.on_note(self.note_text)

    def advance(self, n: int = 1) -> None:
        """Record ``n`` finished steps, then stop the job if a cancel was requested."""
        self.done += n
        self.on_advance(self.done, self.total)
        self.check()

    def check(self) -> None:
        """Raise :class:`Cancelled` if :meth:`cancel` has been called."""
        if self._cancel.is_set():
            raise Cancelled(f"cancelled during '{self.stage_name}'")

    def close(self) -> None:
        """The job finished or stopped; release any display."""
        self.on_close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- called by the user / GUI ----------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop at its next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    # -- hooks for subclasses --------------------------------------------------------
    def on_stage(self, name: str, total: int) -> None:  # pragma: no cover - hook
        pass

    def on_advance(self, done: int, total: int) -> None:  # pragma: no cover - hook
        pass

    def on_close(self) -> None:  # pragma: no cover - hook
        pass

    def on_note(self, text: str) -> None:  # pragma: no cover - hook
        pass


class CallbackProgress(Progress):
    """Forwards every update to ``callback(stage, done, total)``."""

    def __init__(self, callback: Callable[[str, int, int], None]) -> None:
        super().__init__()
        self._callback = callback

    def on_stage(self, name: str, total: int) -> None:
        self._callback(name, 0, total)

    def on_advance(self, done: int, total: int) -> None:
        self._callback(self.stage_name, done, total)


class TextProgress(Progress):
    """A tqdm text bar per stage, written to stderr (used by the command line)."""

    def __init__(self, file=None, disable: bool = False) -> None:
        super().__init__()
        self._file = file or sys.stderr
        self._disable = disable
        self._bar = None

    def on_stage(self, name: str, total: int) -> None:
        from tqdm.auto import tqdm

        self.on_close()
        self._bar = tqdm(total=total or None, desc=name, file=self._file, disable=self._disable,
                         leave=True, dynamic_ncols=True)

    def on_advance(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(done - self._bar.n)

    def on_note(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def on_close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def ensure_progress(progress: Progress | None) -> Progress:
    """The given progress object, or a silent one so jobs can always call it."""
    return progress if progress is not None else Progress()
