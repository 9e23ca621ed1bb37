"""The exception a user can cause, and the one a cancelled job raises."""

from __future__ import annotations

__all__ = ["PanoptemError", "Cancelled"]


class PanoptemError(Exception):
    """A problem with the user's input, configuration or environment.

    The message always says what to change. Widgets show it as a notification and the
    command line prints it on one line and exits with a non-zero status.
    """


class Cancelled(Exception):
    """Raised between steps of a long job (slices, tiles, iterations) after a cancel request."""
