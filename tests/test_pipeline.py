"""3D inference stages run side by side: the forward pass of the next slice runs while the
previous slice is post-processed, with the same result, errors raised where they belong and
no thread left behind."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.inference.pipeline import ahead, ordered_map
from panoptem.inference.stack import segment_stack
from panoptem.inference.volume import Engine3D, Params3D
from panoptem.progress import CallbackProgress, Progress

P2 = Params2D(confidence_thr=0.5)


def _ahead_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("panoptem-")]


def test_ahead_keeps_order_and_raises_at_the_failing_item():
    assert list(ahead(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield from range(3)
        raise ValueError("slice 3 is broken")

    got = []
    with pytest.raises(ValueError, match="slice 3 is broken"):
        for x in ahead(failing()):
            got.append(x)
    assert got == [0, 1, 2]
    assert not _ahead_threads()


def test_ahead_stops_its_thread_when_the_consumer_stops():
    produced, finished = [], threading.Event()

    def endless():
        try:
            i = 0
            while True:
                produced.append(i)
                yield i
                i += 1
        finally:
            finished.set()

    items = ahead(endless(), depth=2)
    assert [next(items) for _ in range(5)] == [0, 1, 2, 3, 4]
    items.close()
    assert finished.is_set()  # the source generator was closed, in the thread
    assert not _ahead_threads()
    assert len(produced) <= 5 + 2 + 1  # at most depth items (and the one in hand) beyond


def test_ordered_map_keeps_order_and_stops_its_threads():
    def slow_square(x):
        time.sleep(0.01 * (x % 3))  # later items often finish first
        return x * x

    assert list(ordered_map(slow_square, range(20), 3)) == [x * x for x in range(20)]
    assert not _ahead_threads()

    started = []

    def record(x):
        started.append(x)
        if x == 4:
            raise ValueError("item 4 is broken")
        return x

    got = []
    with pytest.raises(ValueError, match="item 4"):
        for y in ordered_map(record, range(100), 2):
            got.append(y)
    assert got == [0, 1, 2, 3]
    assert max(started) <= 4 + 2  # no more than the items in flight
    assert not _ahead_threads()

    items = ordered_map(lambda x: x, iter(range(1000)), 2)
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    items.close()
    assert not _ahead_threads()


class Watched(Engine2D):
    """A real engine that records whether slice i+1's forward pass started while slice i
    was being post-processed: ``panoptic`` for slice i waits for that (never forever)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started = 0  # forward passes begun
        self.overlapped: list[bool] = []
        self.n_slices = 0
        self.wait = True
        self.threads: set[str] = set()  # where the forward passes ran

    def heads_batch(self, images, *args):  # every forward pass, of one slice or several
        self.started += len(images)
        self.threads.add(threading.current_thread().name)
        return super().heads_batch(images, *args)

    def panoptic_codes(self, probs, ctr, off, p, shape):
        i = len(self.overlapped)
        if i + 1 < self.n_slices and self.wait:
            # sequential code would start slice i+1 only after this returns: the wait fails
            for _ in range(200):  # 20 s at most
                if self.started > i + 1:
                    break
                time.sleep(0.1)
            self.overlapped.append(self.started > i + 1)
        else:
            self.overlapped.append(True)
        return super().panoptic_codes(probs, ctr, off, p, shape)


@pytest.mark.parametrize("median_size", [1, 3])
def test_forward_of_next_slice_runs_during_postprocessing(small_config, em_volume, median_size):
    vol = np.ascontiguousarray(em_volume[:6, :64, :64])
    params = Params2D().validated()
    watched = Watched(small_config)
    watched.n_slices = vol.shape[0]
    res = segment_stack(watched, vol, params, axis="xy", median_size=median_size, overlap=True)
    assert watched.overlapped == [True] * vol.shape[0]
    assert watched.threads == {"panoptem-model-xy"}

    # the same stack as slice-after-slice inference by hand
    plain = Engine2D(small_config)
    outs = [plain.outputs(torch_slice, params) for torch_slice in _unit_slices(vol)]
    ref = segment_stack(plain, vol, params, axis="xy", median_size=median_size, outputs=iter(outs))
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0 and res.stats == ref.stats
    assert not _ahead_threads()


def test_one_worker_keeps_the_forward_passes_in_the_calling_thread(small_config, em_volume):
    vol = np.ascontiguousarray(em_volume[:3, :64, :64])
    watched = Watched(small_config)
    watched.n_slices, watched.wait = vol.shape[0], False
    segment_stack(watched, vol, Params2D().validated(), median_size=1, workers=1)
    assert watched.threads == {threading.current_thread().name}


class _FirstTwoMeet(Engine2D):
    """A real engine whose first two calls of a watched method wait for each other (20 s
    at most: one call at a time never gets there), recording the threads they ran in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.barrier = threading.Barrier(2, timeout=20)
        self.lock = threading.Lock()
        self.calls = 0
        self.threads: set[str] = set()

    def _meet(self, record=lambda: None) -> None:
        with self.lock:
            self.calls += 1
            first_two = self.calls <= 2
            self.threads.add(threading.current_thread().name)
            record()
        if first_two:
            self.barrier.wait()  # raises BrokenBarrierError unless both run at once


class Paired(_FirstTwoMeet):
    """Its first two forward passes meet; it records with how many intra-op threads and on
    how many slices each pass ran."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.intra_op: set[int] = set()
        self.sizes: list[int] = []  # slices per forward pass, in the order they began

    def heads_batch(self, images, *args):
        import torch

        def record():
            self.intra_op.add(torch.get_num_threads())
            self.sizes.append(len(images))

        self._meet(record)
        return super().heads_batch(images, *args)


@pytest.fixture
def two_threads():
    """torch with 2 intra-op threads during the test (whatever the machine has)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield torch
    torch.set_num_threads(before)


@pytest.mark.parametrize("median_size, batch", [(1, None), (3, None), (3, 1)])
def test_two_slices_run_at_once_on_a_cpu(small_config, em_volume, median_size, batch,
                                         two_threads):
    """By default on a CPU with 2 or more intra-op threads, small slices run through the
    model two at a time, each on half the threads, with the result of one at a time. Slices
    this small for the model's weights also go two per forward pass (``batch``: None, the
    default, gives 2 here; 1 keeps one slice per pass)."""
    torch = two_threads
    vol = np.ascontiguousarray(em_volume[:6, :64, :64])
    params = Params2D().validated()
    paired = Paired(small_config)
    res = segment_stack(paired, vol, params, median_size=median_size, batch=batch)
    assert sorted(paired.sizes) == ([1] * 6 if batch == 1 else [2, 2, 2])
    assert len(paired.threads) == 2 and all(t.startswith("panoptem-model-xy") for t in paired.threads)
    assert paired.intra_op == {1}
    assert torch.get_num_threads() == 2  # restored, also for threads started later
    later = []
    t = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert later == [2]

    ref = segment_stack(Engine2D(small_config), vol, params, median_size=median_size, workers=1)
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0 and res.stats == ref.stats
    assert not _ahead_threads()


def test_large_slices_and_gpus_run_one_slice_at_a_time(small_config, two_threads):
    from panoptem.inference.stack import PARALLEL_SLICE_PIXELS, slice_workers

    torch = two_threads
    engine = Engine2D(small_config)
    side = int(PARALLEL_SLICE_PIXELS**0.5)
    p = Params2D().validated()
    assert slice_workers(engine, (side, side), p) == 2
    assert slice_workers(engine, (side + 16, side), p) == 1
    assert slice_workers(engine, (2 * side, 2 * side), Params2D(downsampling=2).validated()) == 2
    torch.set_num_threads(1)
    assert slice_workers(engine, (64, 64), p) == 1
    torch.set_num_threads(2)
    engine.device = torch.device("cuda")  # the choice only; nothing runs
    assert slice_workers(engine, (64, 64), p) == 1


def test_only_small_slices_of_float_models_go_two_per_forward_pass(small_config, two_threads):
    """Two slices per forward pass where the model's weights are large for the slice: at
    least BATCH_WEIGHT_BYTES_PER_PIXEL bytes per (padded) model-input pixel."""
    from dataclasses import replace

    from panoptem.inference.stack import BATCH_WEIGHT_BYTES_PER_PIXEL, slice_batch

    torch = two_threads
    engine = Engine2D(small_config)
    pf = engine.padding_factor
    p = Params2D().validated()
    nbytes = engine.loaded.weight_bytes
    params = sum(t.numel() for t in torch.jit.load(small_config["model"]).parameters())
    assert params * 4 <= nbytes < params * 4 * 1.1  # float32 weights, and BN statistics
    assert Engine2D(small_config).loaded.weight_bytes == nbytes  # also from the model cache
    rows = nbytes // BATCH_WEIGHT_BYTES_PER_PIXEL // 64 // pf * pf  # 64-wide slices, at the limit
    assert rows >= 2 * pf
    assert slice_batch(engine, (rows, 64), p) == 2
    assert slice_batch(engine, (rows - pf + 1, 64), p) == 2  # padded to `rows`
    assert slice_batch(engine, (rows + 1, 64), p) == 1  # padded to rows + pf: past the limit
    assert slice_batch(engine, (2 * rows, 128), Params2D(downsampling=2).validated()) == 2
    float_model = engine.loaded
    engine.loaded = replace(float_model, quantized=True)  # int8 weights are packed already
    assert slice_batch(engine, (64, 64), p) == 1
    engine.loaded = float_model
    torch.set_num_threads(1)  # one slice at a time: one per pass
    assert slice_batch(engine, (64, 64), p) == 1
    torch.set_num_threads(2)
    engine.device = torch.device("cuda")  # the choice only; nothing runs
    assert slice_batch(engine, (64, 64), p) == 1


def test_a_forward_pass_of_two_slices_gives_each_slice_its_own_outputs(small_config, em_volume):
    import torch

    engine = Engine2D(small_config)
    p = Params2D().validated()
    images = [torch.from_numpy(em_volume[i, :64, :96].astype(np.float32)) for i in (0, 7)]
    both = engine.outputs_batch(images, p)
    assert len(both) == 2
    for image, outs in zip(images, both, strict=True):
        for got, want in zip(outs, engine.outputs(image, p), strict=True):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the two slices differ, so a mix-up would show
    assert not torch.allclose(both[0][0], both[1][0], atol=1e-2)
    with pytest.raises(ValueError, match="share a shape"):
        engine.outputs_batch([images[0], images[1][:, :64]], p)


def test_slices_are_read_ahead_without_torch(small_config, em_volume, monkeypatch):
    """Slices are read in a thread of their own, which runs no torch code: a second thread
    running torch's CPU kernels slowed the forward passes by about 40 % on 2 cores."""
    import torch

    from panoptem.inference import stack

    where: dict[str, set[str]] = {"read": set(), "tensor": set()}
    read_slice, to_unit_range = stack.read_slice, stack.pre.to_unit_range

    def reading(*args):
        where["read"].add(threading.current_thread().name)
        return read_slice(*args)

    def converting(image, value_range):
        assert not isinstance(image, torch.Tensor)
        where["tensor"].add(threading.current_thread().name)
        return to_unit_range(image, value_range)

    monkeypatch.setattr(stack, "read_slice", reading)
    monkeypatch.setattr(stack.pre, "to_unit_range", converting)
    vol = np.ascontiguousarray(em_volume[:3, :64, :64])
    for workers in (1, 2):
        where["read"].clear()
        where["tensor"].clear()
        watched = Watched(small_config)
        watched.n_slices, watched.wait = vol.shape[0], False
        segment_stack(watched, vol, Params2D().validated(), median_size=1, workers=workers)
        assert where["read"] == {"panoptem-read-xy"}
        assert where["tensor"] == watched.threads  # where the forward passes run
        assert "panoptem-read-xy" not in watched.threads


def _unit_slices(vol):
    from panoptem.inference import preprocess as pre

    return [pre.to_unit_range(vol[i], None) for i in range(vol.shape[0])]


class CancelAfter(Progress):
    """The user presses Cancel once ``n`` slices are done."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def on_advance(self, done: int, total: int) -> None:
        if done >= self.n:
            self.cancel()


@pytest.mark.parametrize("overlap, workers, batch, post, to_host",
                         [(False, 1, 1, 1, None), (True, 1, 1, 1, None), (None, 2, 1, 1, None),
                          (None, 2, 2, 1, None), (None, 1, 2, 1, None), (True, 1, 1, 3, None),
                          (True, 1, 1, 3, True)])  # the last as on a GPU
def test_cancel_and_model_error_leave_no_thread(small_config, em_volume, overlap, workers, batch,
                                                post, to_host):
    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    params = Params2D().validated()
    engine = Engine2D(small_config)
    with pytest.raises(Cancelled):
        segment_stack(engine, vol, params, median_size=1, progress=CancelAfter(2), overlap=overlap,
                      workers=workers, batch=batch, post=post, to_host=to_host)
    assert not _ahead_threads()

    class Broken(Engine2D):
        def heads_batch(self, images, *args):
            done = getattr(self, "done", 0)  # slices passed so far
            if done <= 4 < done + len(images):
                raise RuntimeError("out of memory on slice 4")
            self.done = done + len(images)
            return super().heads_batch(images, *args)

    with pytest.raises(RuntimeError, match="slice 4"):
        segment_stack(Broken(small_config), vol, params, median_size=1, overlap=overlap,
                      workers=workers, batch=batch, post=post, to_host=to_host)
    assert not _ahead_threads()


class PairedPost(_FirstTwoMeet):
    """Its first two slices are post-processed only while both are at once."""

    def panoptic_codes(self, *args):
        self._meet()
        return super().panoptic_codes(*args)


@pytest.mark.parametrize("median_size, overlap", [(1, True), (3, True), (3, False)])
def test_slices_are_post_processed_side_by_side(small_config, em_volume, median_size, overlap):
    """``post`` slices are post-processed at once, in threads of their own, and matched in
    order: the result is that of one slice at a time."""
    vol = np.ascontiguousarray(em_volume[:7, :64, :64])
    params = Params2D().validated()
    paired = PairedPost(small_config)
    res = segment_stack(paired, vol, params, median_size=median_size, overlap=overlap, post=3)
    assert paired.calls == 7
    assert paired.threads and all(t.startswith("panoptem-post-xy") for t in paired.threads)
    ref = segment_stack(Engine2D(small_config), vol, params, median_size=median_size, overlap=overlap,
                        post=1)
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0 and res.stats == ref.stats
    assert not _ahead_threads()
    with pytest.raises(ValueError, match="post must be at least 1"):
        segment_stack(Engine2D(small_config), vol, params, post=0)


def test_gpus_post_process_several_slices_at_once(small_config, monkeypatch):
    """On a GPU, up to MAX_POST_WORKERS slices at once, 2 cores left for the forward passes
    and the matching; on a CPU one (the forward passes use every core)."""
    import os

    import torch

    from panoptem.inference.stack import MAX_POST_WORKERS, post_workers

    engine = Engine2D(small_config)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert post_workers(engine) == 1
    engine.device = torch.device("cuda")  # the choice only; nothing runs
    assert post_workers(engine) == MAX_POST_WORKERS == 4
    for cores, count in [(5, 3), (3, 1), (2, 1), (None, 1)]:
        monkeypatch.setattr(os, "cpu_count", lambda cores=cores: cores)
        assert post_workers(engine) == count


class CentresSeen(Engine2D):
    """A real engine that keeps the centre heat map each post-processing call receives."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.centres: list = []

    def panoptic_codes(self, probs, ctr, off, p, shape):
        self.centres.append(ctr)
        return super().panoptic_codes(probs, ctr, off, p, shape)


def test_on_a_gpu_the_forward_thread_copies_the_outputs_to_the_cpu(small_config, em_volume,
                                                                  monkeypatch):
    """On a GPU, the thread that runs the forward passes copies each slice's outputs to the
    CPU (``to_host``), and the post-processing threads get those copies; a CPU engine's
    outputs go on as they are. The result is the same either way."""
    import torch

    from panoptem.inference import stack as st

    assert not st.outputs_to_host(Engine2D(small_config))
    gpu = Engine2D(small_config)
    gpu.device = torch.device("cuda")  # the choice only; nothing runs
    assert st.outputs_to_host(gpu)

    copies, threads = [], set()
    plain = st._queued

    def watched(forward, groups, device):  # fresh tensors, kept to be recognised downstream
        for outs in plain(forward, groups, device):
            threads.add(threading.current_thread().name)
            host = [tuple(t.clone() for t in out) for out in outs]
            copies.extend(t for out in host for t in out)
            yield host

    monkeypatch.setattr(st, "_queued", watched)
    vol = np.ascontiguousarray(em_volume[:6, :64, :64])
    params = Params2D().validated()
    seen = CentresSeen(small_config)
    res = segment_stack(seen, vol, params, overlap=True, post=2, to_host=True)
    assert threads == {"panoptem-model-xy"}
    assert len(seen.centres) == 6
    assert all(any(c is t for t in copies) for c in seen.centres)

    copies.clear()
    ref = segment_stack(CentresSeen(small_config), vol, params, overlap=True, post=2)
    assert not copies  # a CPU engine's default: no copies
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0 and res.stats == ref.stats
    assert not _ahead_threads()


def test_outputs_computed_elsewhere_are_copied_in_the_thread_that_reads_them(small_config, em_volume,
                                                                           monkeypatch):
    """Outputs given to the stack (multi-device inference: rank 0's gathered outputs) go
    through the same copy to the CPU, in the thread that reads them; a cancelled run
    closes their source."""
    from panoptem.inference import stack as st

    vol = np.ascontiguousarray(em_volume[:6, :64, :64])
    params = Params2D().validated()
    plain = Engine2D(small_config)
    outs = [plain.outputs(s, params) for s in _unit_slices(vol)]
    threads, copied = set(), []
    to_host = st._to_host

    def watched(items, device, wait=True):
        threads.add(threading.current_thread().name)
        copied.append(items)
        return to_host(items, device, wait)

    monkeypatch.setattr(st, "_to_host", watched)
    res = segment_stack(plain, vol, params, outputs=iter(outs), overlap=True, to_host=True)
    assert len(copied) == 6 and threads == {"panoptem-model-xy"}
    ref = segment_stack(plain, vol, params, outputs=iter(outs), overlap=True)
    assert len(copied) == 6  # not without to_host on a CPU
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0

    closed = threading.Event()

    def source():
        try:
            yield from outs
        finally:
            closed.set()

    with pytest.raises(Cancelled):
        segment_stack(plain, vol, params, outputs=source(), overlap=True, to_host=True,
                      progress=CancelAfter(2))
    assert closed.is_set()
    assert not _ahead_threads()


class Steps(Engine2D):
    """A real engine that notes its forward passes (whether they were waited for) and
    post-processing calls in the order they happen."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps: list[tuple] = []

    def heads_batch(self, images, downsampling=1, fine_boundaries=False, wait=True):
        self.steps.append(("forward", sum(s[0] == "forward" for s in self.steps), wait))
        return super().heads_batch(images, downsampling, fine_boundaries, wait)

    def panoptic_codes(self, probs, ctr, off, p, shape):
        self.steps.append(("post", sum(s[0] == "post" for s in self.steps)))
        return super().panoptic_codes(probs, ctr, off, p, shape)


def test_with_copies_to_the_cpu_the_next_forward_pass_is_queued_first(small_config, em_volume):
    """With ``to_host`` (on a GPU) each slice's outputs are handed on only once the next
    slice's forward pass, not waited for, is queued: the GPU never waits for the thread
    that feeds it. Shown in one thread, where the order of the steps is fixed."""
    vol = np.ascontiguousarray(em_volume[:5, :64, :64])
    params = Params2D().validated()
    queued = Steps(small_config)
    res = segment_stack(queued, vol, params, median_size=1, overlap=False, to_host=True)
    f, p = ("forward",), ("post",)
    assert queued.steps == [f + (0, False), f + (1, False), p + (0,), f + (2, False), p + (1,),
                            f + (3, False), p + (2,), f + (4, False), p + (3,), p + (4,)]
    waited = Steps(small_config)
    ref = segment_stack(waited, vol, params, median_size=1, overlap=False, to_host=False)
    assert waited.steps == [s for i in range(5) for s in (f + (i, True), p + (i,))]
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.store.max() > 0 and res.stats == ref.stats


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_stack_post_processes_on_the_cpu_with_the_same_result(small_config, em_volume):
    vol = np.ascontiguousarray(em_volume[:8, :64, :64])
    params = Params2D().validated()
    seen = CentresSeen(small_config, device="cuda")
    res = segment_stack(seen, vol, params)
    assert {c.device.type for c in seen.centres} == {"cpu"}
    on_gpu = CentresSeen(small_config, device="cuda")
    ref = segment_stack(on_gpu, vol, params, to_host=False)
    assert {c.device.type for c in on_gpu.centres} == {"cuda"}
    np.testing.assert_array_equal(res.store, ref.store)
    assert res.stats == ref.stats


# -- ortho-plane: the next stack's forward passes begin while the stack before finishes --------


class StackWatched(Engine2D):
    """A real engine that notes which stack's forward passes ran where and holds the last
    slice of the xy stack until a forward pass of the xz stack has begun, and the last of
    the xz stack until one of the yz stack has (20 s at most each); slices are told apart
    by shape. ``fail`` names a stack whose post-processing raises: "xy" at its last slice
    (after the wait), "xz" at its first."""

    NEXT = {"xy": "xz", "xz": "yz"}

    def __init__(self, *args, shapes: dict, slices: dict, fail: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.axis_of = {shape: ax for ax, shape in shapes.items()}
        self.slices = slices  # per axis
        self.fail = fail
        self.began = {ax: threading.Event() for ax in shapes}
        self.forward_threads: set[str] = set()
        self.done = dict.fromkeys(shapes, 0)
        self.met: dict[str, bool] = {}

    def heads_batch(self, images, *args):
        name = threading.current_thread().name
        self.forward_threads.add(name)
        for ax, began in self.began.items():
            if name == f"panoptem-model-{ax}":
                began.set()
        return super().heads_batch(images, *args)

    def panoptic_codes(self, probs, ctr, off, p, shape):
        axis = self.axis_of[tuple(shape)]
        self.done[axis] += 1
        if axis in self.NEXT and self.done[axis] == self.slices[axis]:
            # one stack after the other: the next stack never begins while this waits
            self.met[axis] = self.began[self.NEXT[axis]].wait(20)
            if self.fail == "xy" == axis:
                raise PanoptemError("the xy stack failed on its last slice")
        if axis == "xz" and self.fail == "xz":
            raise PanoptemError("the xz stack failed on its first slice")
        return super().panoptic_codes(probs, ctr, off, p, shape)


def _ortho_case(small_config, em_volume, engine=None, **kwargs):
    vol = np.ascontiguousarray(em_volume[:6, :40, :48])  # xy 40 x 48, xz 6 x 48, yz 6 x 40
    shapes = {"xy": (40, 48), "xz": (6, 48), "yz": (6, 40)}
    slices = {"xy": 6, "xz": 40, "yz": 48}
    return vol, (engine or StackWatched)(small_config, shapes=shapes, slices=slices, **kwargs)


def test_next_stack_begins_while_the_stack_before_finishes(small_config, em_volume):
    vol, engine = _ortho_case(small_config, em_volume)
    p3 = Params3D(ortho_plane=True, min_size=0, min_extent=0, return_stacks=True)
    stages = []
    res = Engine3D(engine).segment(vol, P2, p3, overlap=True,
                                   progress=CallbackProgress(lambda s, d, t: stages.append(s)))
    assert engine.met == {"xy": True, "xz": True}
    assert engine.forward_threads == {"panoptem-model-xy", "panoptem-model-xz", "panoptem-model-yz"}
    # the progress follows the stack whose forward passes run; the last one to its end
    names = list(dict.fromkeys(stages))
    assert names[:3] == ["stack xy", "stack xz", "stack yz"] and "matching xy" not in names
    assert names[3:5] == ["matching yz", "writing"] and names[-1] == "consensus: voting"
    # the same result as one stack after the other
    ref = Engine3D(small_config).segment(vol, P2, p3, overlap=False)
    np.testing.assert_array_equal(res.classes["mito"], ref.classes["mito"])
    for ax in ("xy", "xz", "yz"):
        np.testing.assert_array_equal(res.stacks[ax], ref.stacks[ax])
    assert res.classes["mito"].max() > 0
    assert not _ahead_threads()


@pytest.mark.parametrize("fail", ["xy", "xz"])
def test_a_failing_stack_stops_the_others_and_its_error_is_raised(small_config, em_volume, fail):
    vol, engine = _ortho_case(small_config, em_volume, fail=fail)
    with pytest.raises(PanoptemError, match=f"the {fail} stack failed"):
        Engine3D(engine).segment(vol, P2, Params3D(ortho_plane=True), overlap=True)
    assert not _ahead_threads()
    assert "panoptem-model-yz" not in engine.forward_threads  # never begun


def test_cancel_while_stacks_overlap_stops_them_all(small_config, em_volume, tmp_path):
    from testutils import CancelAt

    vol, engine = _ortho_case(small_config, em_volume)
    path = tmp_path / "cancelled.zarr"
    with pytest.raises(Cancelled):
        Engine3D(engine).segment(vol, P2, Params3D(ortho_plane=True), overlap=True,
                                 zarr_path=path, progress=CancelAt("stack xz", 2))
    assert not _ahead_threads()
    assert not [p.name for p in path.iterdir() if p.is_dir()]  # no array left complete


@pytest.mark.parametrize("ortho", [False, True])
def test_3d_inference_on_a_cpu_runs_small_slices_two_at_a_time(small_config, em_volume, ortho,
                                                               two_threads):
    """The 3D runs leave the stacks' CPU defaults alone: slices two at a time, one stack
    after the other."""
    vol = np.ascontiguousarray(em_volume[:6, :40, :48])
    paired = Paired(small_config)
    res = Engine3D(paired).segment(vol, P2, Params3D(ortho_plane=ortho, min_size=0))
    axes = ["xy", "xz", "yz"] if ortho else ["xy"]  # the first two passes met (the barrier)
    assert paired.threads == {f"panoptem-model-{ax}_{k}" for ax in axes for k in (0, 1)}
    ref = Engine3D(small_config).segment(vol, P2, Params3D(ortho_plane=ortho, min_size=0),
                                         overlap=False)
    np.testing.assert_array_equal(res.classes["mito"], ref.classes["mito"])
    assert res.classes["mito"].max() > 0
    assert not _ahead_threads()


def test_an_interrupt_while_the_last_stack_finishes_stops_it(small_config, em_volume, tmp_path,
                                                             monkeypatch):
    """Ctrl-C in the calling thread while it waits for the stacks: they stop at their next
    step, and nothing is left running or written."""
    from panoptem.inference import volume

    interrupted = threading.Event()

    def interrupt(futures):
        interrupted.set()
        raise KeyboardInterrupt

    monkeypatch.setattr(volume, "wait", interrupt)

    class HoldLastYz(StackWatched):  # the yz stack's last slice waits for the interrupt
        def panoptic_codes(self, probs, ctr, off, p, shape):
            if self.axis_of[tuple(shape)] == "yz" and self.done["yz"] == 47:
                interrupted.wait(20)
                time.sleep(0.5)  # still busy when the interrupt comes out, unless waited for
            return super().panoptic_codes(probs, ctr, off, p, shape)

    vol, engine = _ortho_case(small_config, em_volume, HoldLastYz)
    path = tmp_path / "interrupted.zarr"
    with pytest.raises(KeyboardInterrupt):
        Engine3D(engine).segment(vol, P2, Params3D(ortho_plane=True), overlap=True, zarr_path=path)
    assert interrupted.is_set()  # while the yz stack ran: its last slice waited for it
    assert not _ahead_threads()  # every stack stopped or finished before the error came out
    assert not [p.name for p in path.iterdir() if p.is_dir()]
