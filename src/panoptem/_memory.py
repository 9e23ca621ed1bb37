"""Giving the memory that numpy and torch have freed back to the operating system.

glibc's allocator keeps freed blocks for reuse, in one arena per thread that allocated them;
a freed block below one still in use is never returned by ``free`` alone. After a model is
prepared, or after a stack of slices ran through two forward-pass threads, that is hundreds
of megabytes which the process still holds. :func:`release_free_memory` asks the allocator
to return it (``malloc_trim``, as dask.distributed's workers do). It frees nothing that is
in use and changes no allocator setting: memory allocated later comes from the OS again.

Measured on an ortho-plane run of MitoNet_v1 (64 x 256 x 256, 2 cores): peak resident
memory 941 MB without, 799-833 MB with a release after loading the model and after each
stack.
"""

from __future__ import annotations

import ctypes
import functools
import sys

__all__ = ["release_free_memory"]


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library this process runs on
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> bool:
    """Return the C allocator's free memory to the OS, where the C library can.

    Returns True if memory was returned, False if there was none to return or the
    platform's C library has no ``malloc_trim`` (macOS, Windows, musl).
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
