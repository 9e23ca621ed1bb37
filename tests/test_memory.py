"""Freed memory goes back to the operating system after a model is prepared and after each
3D stack, instead of staying in the allocator's per-thread arenas."""

from __future__ import annotations

import numpy as np
import pytest

from panoptem import _memory
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D

MB = 2**20


def _resident_bytes() -> int:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_release_free_memory_returns_freed_heap_to_the_os():
    if _memory._malloc_trim() is None:
        pytest.skip("this C library has no malloc_trim")
    # 64 KiB blocks come from the heap, not from mmap; the last one, kept, pins the top of
    # the heap, so free() alone returns none of the 2000 blocks below it
    blocks = [np.ones(64 * 1024, np.uint8) for _ in range(2000)]
    kept = blocks[-1]
    del blocks
    before = _resident_bytes()
    assert _memory.release_free_memory()
    released = before - _resident_bytes()
    assert released > 64 * MB, f"{released / MB:.0f} MB returned of about 125 MB freed"
    assert kept.sum() == 64 * 1024  # what is still in use is untouched


def test_3d_run_releases_memory_after_loading_and_after_each_stack(small_config, em_volume,
                                                                   monkeypatch):
    import panoptem.inference.stack as stack_module
    import panoptem.loading as loading_module

    calls = []
    monkeypatch.setattr(loading_module, "release_free_memory", lambda: calls.append("load"))
    monkeypatch.setattr(stack_module, "release_free_memory", lambda: calls.append("stack"))
    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    engine = Engine3D(small_config)
    assert calls == ["load"]
    res = engine.segment(vol, Params2D(), Params3D(ortho_plane=True, min_size=0, min_extent=0))
    assert calls == ["load", "stack", "stack", "stack"]
    (labels,) = res.classes.values()
    assert labels.shape == vol.shape and labels.max() > 0
