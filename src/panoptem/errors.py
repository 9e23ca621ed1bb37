"""The exception a user can cause, the one a cancelled job raises, and how a library's own
exception is worded inside panoptem's messages."""

from __future__ import annotations

__all__ = ["PanoptemError", "Cancelled", "describe", "system_reason"]


class PanoptemError(Exception):
    """A problem with the user's input, configuration or environment.

    The message always says what to change. Widgets show it as a notification and the
    command line prints it on one line and exits with a non-zero status.
    """


class Cancelled(Exception):
    """Raised between steps of a long job (slices, tiles, iterations) after a cancel request.

    ``kept`` says what the job kept (e.g. "The last checkpoint is in ..."), for the user.
    """

    def __init__(self, *args, kept: str = "") -> None:
        super().__init__(*args)
        self.kept = kept


def describe(exc: BaseException, limit: int = 300) -> str:
    """One line of a library's exception, in its own words, for a PanoptemError message.

    The first non-empty line of its text (the last for TorchScript interpreter errors,
    which put the cause at the end), cut to ``limit`` characters; the exception's type
    name when it has no text.
    """
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    text = lines[-1] if "TorchScript interpreter" in lines[0] else lines[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def system_reason(exc: BaseException) -> str:
    """The operating system's reason behind a wrapped network or file error ("Connection
    refused", "Name or service not known"), found by following the exception's causes;
    :func:`describe` of ``exc`` itself when there is none."""
    todo, seen = [exc], set()
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        reason = getattr(e, "reason", None)
        todo += [reason if isinstance(reason, BaseException) else None, e.__cause__,
                 e.__context__, *(a for a in e.args if isinstance(a, BaseException))]
    return describe(exc)
