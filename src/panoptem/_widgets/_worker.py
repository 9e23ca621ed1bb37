"""Running long panoptem work off the GUI thread, with a napari progress bar and cancel.

Every widget hands its long job to :func:`start_job`. The job is a plain function
``work(progress)`` that calls the core with ``progress`` (a :class:`panoptem.progress.Progress`):
the core announces stages and steps (slices, tiles, batch images, epochs), and this module
turns them into a determinate napari progress bar. Progress updates are emitted through a
Qt signal from the worker thread and applied in the GUI thread, because napari progress
bars are GUI objects. The bar's Cancel button (napari's activity dock) and :meth:`Job.cancel`
both set the Progress's cancel flag, so the core raises :class:`~panoptem.errors.Cancelled`
at its next step.

Outcomes become napari notifications (warnings raised in the worker too): a :class:`~panoptem.errors.PanoptemError` shows its
message (which says what to change), a cancel shows "<title> cancelled", anything else
shows the exception text.

Torch threads
-------------
torch keeps one process-wide intra-op thread count (``torch.set_num_threads``); with
torch 2.13 a worker thread sees the count the GUI thread set, and a forward pass in a
napari worker runs as fast as in the main thread (``benchmarks/bench_worker.py``; numbers
in ``benchmarks/README.md``). Because some OpenMP builds keep the count per thread, each
job still sets, inside its worker thread, the count the GUI thread has when the job starts
(only if torch is already imported and the counts differ): a cheap guard, not a fix for
a slowdown seen here.

Set ``PANOPTEM_NOTHREADS=1`` to run jobs synchronously in the GUI thread (debugging,
profiling); the callbacks and notifications are the same.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from napari.utils.notifications import show_error, show_info, show_warning
from napari.utils.progress import cancelable_progress
from qtpy.QtCore import QObject, Signal

from panoptem.errors import Cancelled, PanoptemError
from panoptem.progress import Progress

__all__ = ["Job", "start_job", "last_job", "NOTHREADS_ENV"]

#: Environment variable: "1" runs jobs in the calling (GUI) thread.
NOTHREADS_ENV = "PANOPTEM_NOTHREADS"

#: The most recently started job (tests and scripts can wait on it).
last_job: Job | None = None

# jobs whose worker is still running; keeps them (and their Qt objects) alive
_running: set[Job] = set()


class _Relay(QObject):
    """Carries progress from the worker thread to the GUI thread (queued signal)."""

    update = Signal(str, int, int)


class _Bar(cancelable_progress):
    """A napari progress bar whose Cancel button cancels the job at once."""

    def cancel(self) -> None:
        super().cancel()
        if self.cancel_callback is not None:
            self.cancel_callback()


class _SignalProgress(Progress):
    """A Progress that emits every stage/step through a Qt signal."""

    def __init__(self, relay: _Relay) -> None:
        super().__init__()
        self._relay = relay

    def on_stage(self, name: str, total: int) -> None:
        self._relay.update.emit(name, 0, total)

    def on_advance(self, done: int, total: int) -> None:
        self._relay.update.emit(self._label(), done, total)

    def on_note(self, text: str) -> None:
        self._relay.update.emit(self._label(), self.done, self.total)

    def _label(self) -> str:
        return f"{self.stage_name} ({self.note_text})" if self.note_text else self.stage_name


def _torch_threads() -> int | None:
    """The GUI thread's torch intra-op thread count, if torch is imported (never imports it)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def _set_torch_threads(n: int | None) -> None:
    torch = sys.modules.get("torch")
    if n is not None and torch is not None and torch.get_num_threads() != n:
        torch.set_num_threads(n)


class Job:
    """One long job: its worker, its progress bar and its outcome.

    Attributes
    ----------
    title : str
        Shown on the progress bar and in notifications.
    progress : Progress
        Passed to the work function; ``progress.cancel()`` stops it at the next step.
    worker : napari FunctionWorker or None
        The thread worker (``None`` when run synchronously). Tests can wait with
        ``qtbot.waitSignal(job.worker.finished)`` or ``qtbot.waitUntil(lambda: job.done)``.
    done : bool
        True once the job finished, failed or was cancelled and its callbacks ran.
    result, error
        The work function's return value, or the exception it raised.
    """

    def __init__(self, work: Callable[[Progress], Any], title: str,
                 on_done: Callable[[Any], None] | None,
                 on_error: Callable[[BaseException], None] | None) -> None:
        self.title = title
        self._work = work
        self._on_done = on_done
        self._on_error = on_error
        self._relay = _Relay()
        self._relay.update.connect(self._show_progress)
        self.progress = _SignalProgress(self._relay)
        self.bar: _Bar | None = None
        self._desc = title
        self.worker = None
        self.done = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._threads = _torch_threads()

    # -- the worker thread ------------------------------------------------------------
    def _run(self) -> Any:
        _set_torch_threads(self._threads)
        return self._work(self.progress)

    # -- the GUI thread ---------------------------------------------------------------
    def _show_progress(self, stage: str, done: int, total: int) -> None:
        bar = self.bar
        if bar is None or bar.is_canceled:
            return
        desc = f"{self.title}: {stage}" if stage else self.title
        if desc != self._desc:
            self._desc = desc
            bar.set_description(desc)
        if total != bar.total:
            bar.total = total
        if done != bar.n:
            bar.n = done
            bar.events.value(value=done)

    def _returned(self, result: Any) -> None:
        self.result = result
        if self._on_done is not None:
            try:
                self._on_done(result)
            except PanoptemError as err:
                self._errored(err)

    def _errored(self, err: BaseException) -> None:
        self.error = err
        if isinstance(err, Cancelled):
            kept = getattr(err, "kept", "")
            show_info(f"{self.title} cancelled." + (f" {kept}" if kept else ""))
        elif isinstance(err, PanoptemError):
            show_error(str(err))
        else:
            show_error(f"{self.title} failed: {type(err).__name__}: {err}")
        if self._on_error is not None:
            self._on_error(err)

    def _finished(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.done = True
        _running.discard(self)

    # -- public -----------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the job to stop at its next step (slice, tile, image, iteration)."""
        self.progress.cancel()

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled

    def _start(self) -> Job:
        if os.environ.get(NOTHREADS_ENV, "").strip() == "1":
            try:
                result = self._work(self.progress)
            except Exception as err:  # every failure becomes a notification
                self._errored(err)
            else:
                self._returned(result)
            self._finished()
            return self
        from napari.qt.threading import create_worker

        self.bar = _Bar(total=0, desc=self.title, cancel_callback=self.cancel)
        worker = create_worker(self._run, _ignore_errors=True, _start_thread=False)
        worker.returned.connect(self._returned)
        worker.errored.connect(self._errored)
        worker.finished.connect(self._finished)
        worker.warned.connect(lambda w: show_warning(str(w[0])))
        self.worker = worker
        _running.add(self)
        worker.start()
        return self


def start_job(work: Callable[[Progress], Any], *, title: str,
              on_done: Callable[[Any], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> Job:
    """Run ``work(progress)`` in a napari thread worker and return its :class:`Job`.

    Parameters
    ----------
    work : callable
        Takes a :class:`~panoptem.progress.Progress` and returns the result. It runs in a
        worker thread: it must not touch layers or widgets.
    title : str
        Progress-bar label and notification prefix, e.g. "2D inference".
    on_done : callable, optional
        Called in the GUI thread with the result (add layers here). A PanoptemError it
        raises is shown like one from the work.
    on_error : callable, optional
        Called in the GUI thread with the exception after the notification is shown.
    """
    global last_job
    job = Job(work, title, on_done, on_error)
    last_job = job
    return job._start()
