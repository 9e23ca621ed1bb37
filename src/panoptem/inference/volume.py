"""3D inference of a volume: stack (xy, xz or yz) or ortho-plane, in memory or to zarr.

:class:`Engine3D` runs the "3D Inference" widget's parameters. Stack mode segments the
slices along one axis (:mod:`.stack`), drops objects smaller than ``min_size`` voxels or
thinner than ``min_extent`` along any axis, renumbers each thing class 1..N (in the order
the backward matching pass met them, as the original) and writes one array per class.
Ortho-plane mode runs the three stacks, then the consensus of :mod:`.consensus` per class,
which applies the same filters. Results go to a :class:`~.zarr_store.VolumeOutput`: numpy
arrays (:class:`~.zarr_store.MemoryOutput`) or, chunk by chunk, a zarr store
(:class:`~.zarr_store.ZarrOutput`).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from panoptem._params import as_whole, divisor_count, param, whole_count
from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference import stack as st
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.inference.pipeline import ordered_map
from panoptem.inference.postprocess import fill_holes as fill_holes_2d
from panoptem.inference.zarr_store import (
    MemoryOutput,
    StoreInfo,
    VolumeOutput,
    ZarrOutput,
    parse_chunks,
)
from panoptem.progress import Progress, ensure_progress

__all__ = ["Params3D", "Engine3D", "Result3D", "check_volume", "MEDIAN_SIZES",
           "MIN_DISTANCE_MAX_3D", "LABELS_3D"]

MEDIAN_SIZES = (1, 3, 5, 7, 9, 11)

#: The 3D widget's "Centers Min Distance" goes up to 21 (the 2D widget's to 35).
MIN_DISTANCE_MAX_3D = 21

#: Where the 3D widget words a 2D parameter differently from the 2D widget.
LABELS_3D = {"fine_boundaries": "Fine Boundaries", "semantic_only": "Semantic Only"}


@dataclass(frozen=True)
class Params3D:
    """The stack, ortho-plane and zarr parameters of the 3D widget (original defaults).

    ``max_objects`` is "Max objects per class in 3D" (the label divisor of the stacks; 0
    numbers the stacks' objects 1..N), ``chunk_size`` the zarr chunk text ("256" or
    "z, y, x"). The library defaults to stack mode; the widget starts with ortho-plane on,
    as the original's 1.2.4 widget (``widget_default``).
    """

    median_size: int = param(3, "Median Filter Size", choices=MEDIAN_SIZES,
                             help="Median filter size")
    min_size: int = param(500, "Min Size (Voxels)", min=0, max=1_000_000, step=100,
                          help="Objects with fewer voxels are removed")
    min_extent: int = param(5, "Min Box Extent", min=0, max=1000, step=1,
                            help="Objects thinner than this along any axis are removed")
    max_objects: int = param(10000, "Max objects per class in 3D",
                             help="Maximum number of objects per class in 3D inference "
                                  "(the label divisor of the stacks; 0 numbers them 1..N)")
    plane: str = param("xy", "Inference plane", choices=st.AXES,
                       help="Image plane along which to run inference. Overwritten, if using "
                            "ortho-plane.")
    erode: int = param(0, "Erode Labels", min=0, max=50, step=1,
                       help="How much to erode labels produced after inference")
    dilate: int = param(0, "Dilate Labels", min=0, max=50, step=1,
                        help="How much to dilate labels produced after inference")
    fill_holes: bool = param(False, "Fill holes in segmentation",
                             help="Whether to fill holes in the segmentation after inference")
    ortho_plane: bool = param(False, "Run ortho-plane", widget_default=True,
                              help="Whether to run orthoplane inference")
    return_stacks: bool = param(False, "Return xy, xz, yz stacks",
                                help="Whether to return the inference stacks.")
    vote_thr: int = param(2, "Voxel Vote Thr Out of 3", min=1, max=3, step=1,
                          help="Number of votes out of 3 for a voxel to be labeled in the "
                               "consensus")
    permit_one_stack: bool = param(False, "Permit detections found in 1 stack into consensus",
                                   help="Whether to allow detections into consensus that were "
                                        "picked up by inference in just 1 stack")
    chunk_size: str = param("256", "Chunk size",
                            help="Chunk size of the zarr array. Integer or comma separated "
                                 "list of 3 integers.")

    def validated(self) -> Params3D:
        """Return self with whole-number fields as ints (500.0 -> 500), or raise
        PanoptemError naming the parameter to change."""
        median_size = as_whole(self.median_size)
        if median_size not in MEDIAN_SIZES:
            raise PanoptemError(f"Median Filter Size must be one of {MEDIAN_SIZES}; got {self.median_size!r}.")
        if not isinstance(self.plane, str) or self.plane not in st.AXES:
            raise PanoptemError(f"Inference plane must be xy, xz or yz; got {self.plane!r}.")
        vote_thr = as_whole(self.vote_thr)
        if vote_thr not in (1, 2, 3):
            raise PanoptemError(f"Voxel Vote Thr Out of 3 must be 1, 2 or 3; got {self.vote_thr!r}.")
        counts = {name: whole_count(name, getattr(self, name), hi)
                  for name, hi in (("min_size", None), ("min_extent", None), ("erode", 50),
                                   ("dilate", 50))}
        max_objects = divisor_count("Max objects per class in 3D", self.max_objects)
        parse_chunks(self.chunk_size)
        return replace(self, median_size=median_size, vote_thr=vote_thr, max_objects=max_objects,
                       **counts)


def check_volume(volume):
    """Return a (Z, Y, X) view of ``volume`` or raise PanoptemError saying what to change."""
    shape = tuple(volume.shape)
    if len(shape) == 4 and 1 in (shape[0], shape[-1]):
        volume = volume[0] if shape[0] == 1 else volume[..., 0]
        shape = tuple(volume.shape)
    if len(shape) == 4 and shape[-1] in (3, 4):
        raise PanoptemError(
            f"The volume looks like RGB(A) (shape {shape}); 3D inference takes one grayscale "
            "channel. Convert it to grayscale first."
        )
    if len(shape) != 3:
        raise PanoptemError(
            f"3D inference takes a volume (Z, Y, X); got shape {shape}. Use 2D inference for "
            "single images."
        )
    if min(shape) == 0:
        raise PanoptemError(f"The volume is empty (shape {shape}).")
    dt = np.dtype(volume.dtype)
    if dt.kind == "b" or not np.issubdtype(dt, np.number) or np.issubdtype(dt, np.complexfloating):
        raise PanoptemError(f"The volume has dtype {dt}; give integer or float grayscale data.")
    return volume


@dataclass
class Result3D:
    """Arrays of one 3D run: per class name, and panoptic stacks per axis when asked."""

    classes: dict = field(default_factory=dict)
    stacks: dict = field(default_factory=dict)
    zarr_path: str | None = None

    def layer_names(self, image_name: str) -> dict:
        """The original's layer names: ``<image>-<class>-prediction``, ``<image>-panoptic-stack-<axis>``."""
        names = {f"{image_name}-{c}-prediction": a for c, a in self.classes.items()}
        names.update({f"{image_name}-panoptic-stack-{ax}": a for ax, a in self.stacks.items()})
        return names


#: An in-memory array is written in pieces of at most this many voxels (a few of the
#: store's slices), :data:`WRITE_THREADS` pieces at once: bounded temporaries, and every core
#: busy. On 2 cores, 1M-voxel pieces wrote a 64 x 256 x 256 stack in 11-20 ms against
#: 29-37 ms for 4M-voxel ones (then one piece), and a 64 x 1024 x 1024 one in 118-157
#: against 175-253 ms. Pieces of the store's slices, read where they lie and transposed into
#: place, wrote the yz view of a 64 x 256 x 256 volume in 11-17 ms against 17-32 ms for
#: pieces of ZYX slices (read across the store).
WRITE_PIECE_VOXELS = 1 << 20
WRITE_THREADS = min(4, os.cpu_count() or 1)

#: Ids below this are mapped through a dense look-up table (at most 32 MB of int32), larger
#: ones by a binary search in the sorted keys. A 64 x 256 x 256 stack with 40 ids: 15 ms
#: against 140 ms.
DENSE_LUT_IDS = 1 << 23


class _IdMap:
    """Maps label ids through a table given as sorted ``keys`` and their ``vals``; ids not
    in it (and negative ones) become 0. Built once, applied to many blocks."""

    def __init__(self, keys: np.ndarray, vals: np.ndarray) -> None:
        self.keys, self.vals = keys, vals
        self.lut = None
        if len(keys) and keys[0] > 0 and keys[-1] < DENSE_LUT_IDS:
            self.lut = np.zeros(int(keys[-1]) + 2, vals.dtype)  # ends in 0: ids past the keys
            self.lut[keys] = vals

    def __call__(self, block: np.ndarray) -> np.ndarray:
        keys, vals = self.keys, self.vals
        if self.lut is not None:  # negative ids clip to index 0 (not a key: 0), larger to the end
            return np.take(self.lut, block, mode="clip")
        if not len(keys):
            return np.zeros(block.shape, vals.dtype)
        idx = np.clip(np.searchsorted(keys, block), 0, len(keys) - 1)
        return np.where(keys[idx] == block, vals[idx], 0).astype(vals.dtype, copy=False)


def _blocks(shape, chunks):
    for z in range(0, shape[0], chunks[0]):
        for y in range(0, shape[1], chunks[1]):
            for x in range(0, shape[2], chunks[2]):
                yield (slice(z, min(z + chunks[0], shape[0])), slice(y, min(y + chunks[1], shape[1])),
                       slice(x, min(x + chunks[2], shape[2])))


#: Per stack axis, the store dimension that each ZYX dimension is: a slice-major store of
#: axis 1 is (Y, Z, X), of axis 2 (X, Z, Y).
_ZYX_DIMS = {0: (0, 1, 2), 1: (1, 0, 2), 2: (1, 2, 0)}


def _to_zyx(axis: int, block: np.ndarray) -> np.ndarray:
    """A block of a slice-major store of the given axis, as ZYX (a view)."""
    return block.transpose(_ZYX_DIMS[axis])


def _zyx_index(axis: int, blk) -> tuple:
    """The store index of block ``blk`` (ZYX slices) of a slice-major store of the given
    axis."""
    dims = _ZYX_DIMS[axis]
    return tuple(blk[dims.index(d)] for d in range(3))


def _store_to_zyx(axis: int, idx) -> tuple:
    """The ZYX index of block ``idx`` (store slices): the inverse of :func:`_zyx_index`."""
    return tuple(idx[d] for d in _ZYX_DIMS[axis])


def _write_remapped(src, axis: int, mapping: dict, out, dtype, chunks, prog: Progress,
                    label: str = "writing") -> None:
    """Copy a slice-major store into a ZYX array, mapping ids (others -> 0).

    An in-memory ``out`` is written in pieces of a few of the store's slices (or rows of
    them), at most :data:`WRITE_PIECE_VOXELS` voxels, :data:`WRITE_THREADS` at once
    (``np.take`` leaves the GIL): each piece is read and mapped where it lies in the store,
    then transposed into place. A zarr ``out`` is written block by block (``chunks``).
    """
    keys = np.array(sorted(mapping), dtype=np.int64)
    vals = np.array([mapping[k] for k in keys.tolist()], dtype=dtype)
    id_map = _IdMap(keys, vals)
    if isinstance(out, np.ndarray):
        n, h, w = src.shape
        depth = max(1, WRITE_PIECE_VOXELS // (h * w))
        if axis == 2:  # the yz store's slices are x: runs of at least 16 x (a cache line)
            depth = min(n, max(depth, 16))
        rows = max(1, WRITE_PIECE_VOXELS // (depth * w))
        pieces = [(slice(s0, min(s0 + depth, n)), slice(r0, min(r0 + rows, h)), slice(None))
                  for s0 in range(0, n, depth) for r0 in range(0, h, rows)]
        threads = min(WRITE_THREADS, len(pieces))

        def write(piece):
            out[_store_to_zyx(axis, piece)] = _to_zyx(axis, id_map(np.asarray(src[piece])))
    else:
        pieces, threads = list(_blocks(out.shape, chunks)), 1

        def write(blk):
            out[blk] = id_map(_to_zyx(axis, np.asarray(src[_zyx_index(axis, blk)])))

    prog.stage(label, len(pieces))
    written = ordered_map(write, pieces, threads, name="panoptem-write") if threads > 1 else map(write, pieces)
    try:
        for _ in written:
            prog.advance()
    finally:  # a cancelled run: the threads stop before this returns
        if hasattr(written, "close"):
            written.close()


class Engine3D:
    """Runs a model over volumes with the 3D widget's parameters.

    Parameters
    ----------
    model, device, quantized, precision : as :class:`~panoptem.inference.engine.Engine2D`
    """

    def __init__(self, model="MitoNet_v1", device="cpu", quantized: bool = False,
                 precision: str = "float32") -> None:
        self.engine2d = (model if isinstance(model, Engine2D)
                         else Engine2D(model, device, quantized, precision=precision))
        cfg = self.engine2d.config
        self.class_names = {int(k): str(v) for k, v in cfg["class_names"].items()}
        self.labels = [int(c) for c in cfg.get("labels", self.class_names)]

    def segment(self, volume, params2d: Params2D | None = None, params3d: Params3D | None = None,
                *, zarr_path=None, store_info: StoreInfo | None = None,
                progress: Progress | None = None, outputs_for=None,
                output: VolumeOutput | None = None, value_range=None,
                overlap: bool | None = None) -> Result3D:
        """Segment a (Z, Y, X) volume (numpy, zarr or dask; read slice by slice).

        Parameters
        ----------
        params2d : the 2D block (downsampling, thresholds, min distance, fine boundaries,
            semantic only); its ``max_objects`` is replaced by ``params3d.max_objects``.
        params3d : stack / ortho-plane / zarr parameters.
        zarr_path : str or Path, optional
            Write every result array into this zarr group instead of memory (arrays of an
            earlier run with the same names are replaced once the new ones are complete);
            short for ``output=ZarrOutput(zarr_path, params3d.chunk_size)``.
        store_info : StoreInfo, optional
            Image name, scale and translate recorded in the output (the zarr group, for
            napari), with the model and parameters; default: the output's
            :meth:`~.zarr_store.VolumeOutput.default_info` (for a zarr group the store's
            name without ``_<model>.zarr``, unit scale, zero translate).
        outputs_for : callable(axis) -> iterator of (probs, ctr, off), optional
            Model outputs computed elsewhere (multi-process inference).
        output : VolumeOutput, optional
            Where the arrays go, and in which blocks they are written (its
            :meth:`~.zarr_store.VolumeOutput.chunks_for`); not with ``zarr_path``. Default:
            a :class:`~.zarr_store.ZarrOutput` at ``zarr_path`` if given, else a
            :class:`~.zarr_store.MemoryOutput`.
        value_range : (low, high), optional
            The intensities mapped to 0..255 for a non-uint8 volume; default: the volume's own
            range. A block of a larger volume gets the whole volume's range.
        overlap : bool, optional
            True keeps the device busy: each stack's forward passes run ahead of its
            post-processing (``segment_stack(overlap=True)``), and in ortho-plane mode the
            next stack starts as soon as the forward passes of the one before are done,
            while that one is still post-processed, matched and written; the progress
            follows the stack whose forward passes run. False runs one stack after the
            other, each slice's forward pass, post-processing and matching in turn
            (``segment_stack(overlap=False)``). Default: True on a GPU; on a CPU, where the
            forward passes already take every core, one stack after the other with
            :func:`~.stack.segment_stack`'s CPU default (small slices two at a time). The
            result is the same.

        Returns
        -------
        Result3D: ``classes`` maps class names to int32 instance volumes (ids 1..N) for thing
        classes and uint8 masks for stuff classes; ``stacks`` the panoptic stacks when asked;
        ``zarr_path`` the output's path when it has one.
        """
        if output is not None and zarr_path is not None:
            raise PanoptemError(
                "Give either zarr_path or output, not both: zarr_path is short for "
                "output=ZarrOutput(zarr_path, chunk_size)."
            )
        p3 = (params3d or Params3D()).validated()
        p2 = replace(params2d or Params2D(), max_objects=p3.max_objects, tile_size=0,
                     fill_holes=False).validated()
        volume = check_volume(volume)
        shape = tuple(volume.shape)
        prog = ensure_progress(progress)
        if output is not None:
            out = output
        elif zarr_path is not None:
            out = ZarrOutput(zarr_path, p3.chunk_size)
        else:
            out = MemoryOutput()
        chunks = out.chunks_for(shape)
        result = Result3D(zarr_path=None if out.path is None else str(out.path))
        things = [] if p2.semantic_only else self.engine2d.thing_list
        try:
            vr = value_range if value_range is not None else st.volume_intensity_range(volume)
            axes = ["xy", "xz", "yz"] if p3.ortho_plane else [p3.plane]
            # Ortho-plane with at most one thing class: each stack's part of the consensus
            # inputs is written as soon as it is done, and the stack dropped. With more, the
            # stacks are kept and the inputs written one class at a time (3 views a class).
            early = p3.ortho_plane and sum(c in things for c in self.labels) <= 1
            # every array the stacks write is made here, in this thread
            panoptic = {ax: out.create(f"panoptic_{ax}", shape, np.int32)
                        for ax in axes if p3.return_stacks}
            inputs = {c: self._class_inputs(c, c in things, axes, out, shape)
                      for c in self.labels if early}

            def finish(res: st.StackResult, progress: Progress):
                """Write what is needed of a finished stack; return it if it is needed later."""
                if p3.return_stacks:
                    self._write_stack(res, things, p3, panoptic[res.axis], chunks, progress)
                if not early:
                    return res
                for c, arrays in inputs.items():
                    self._write_class(res, c, c in things, p3, arrays[axes.index(res.axis)],
                                      chunks, progress)
                return None  # its store is no longer needed

            def make_store(ax):
                a = st.AXES[ax]
                sshape = (shape[a], *st.slice_shape(shape, a))
                return out.create(f".stack_{ax}", sshape, np.int32, (1, *out.chunks_for(sshape)[1:]))

            kept = self._run_stacks(volume, p2, p3, axes, vr, make_store, outputs_for, overlap,
                                    finish, prog)
            for c in self.labels:
                name, thing = self.class_names.get(c, str(c)), c in things
                arr = out.create(name, shape, np.int32 if thing else np.uint8)
                if not p3.ortho_plane:
                    self._write_class(kept[axes[0]], c, thing, p3, arr, chunks, prog)
                else:
                    views = (inputs.pop(c) if early
                             else self._class_inputs(c, thing, axes, out, shape))
                    if not early:
                        for ax, view in zip(axes, views, strict=True):
                            self._write_class(kept[ax], c, thing, p3, view, chunks, prog)
                    self._consensus(views, thing, p3, arr, chunks, prog)
                    del views  # this class's inputs are no longer needed
                if thing:
                    self._morphology(arr, p3)
                result.classes[name] = out.commit(name)
            if p3.return_stacks:
                result.stacks = {ax: out.commit(f"panoptic_{ax}") for ax in axes}
            out.write_info(store_info or out.default_info(self.engine2d.model_name),
                           model=self.engine2d.model_name, params2d=asdict(p2), params3d=asdict(p3))
        finally:
            out.cleanup()
        return result

    # ------------------------------------------------------------------ pieces
    def _run_stacks(self, volume, p2, p3, axes, vr, make_store, outputs_for, overlap, finish,
                    prog) -> dict:
        """Segment the stack of each axis and hand it to ``finish(result, progress)``;
        returns what ``finish`` returned, per axis.

        With overlap in ortho-plane mode each stack runs in a thread of its own, started
        once the forward passes of the one before are done. The progress follows the
        stack whose forward passes run (:class:`_StackProgress`); a stack that fails
        stops the others, and its error is raised here once every stack has stopped.
        """
        def run(ax, store, progress, outputs_done=None):
            res = st.segment_stack(
                self.engine2d, volume, p2, axis=ax, median_size=p3.median_size, value_range=vr,
                store=store, outputs=outputs_for(ax) if outputs_for else None, progress=progress,
                overlap=overlap, outputs_done=outputs_done)
            return finish(res, progress)

        # segment_stack gets overlap as given: unset, a CPU runs small slices two at a time
        stagger = overlap if overlap is not None else self.engine2d.device.type != "cpu"
        if len(axes) == 1 or not stagger:
            return {ax: run(ax, make_store(ax), prog) for ax in axes}

        stop = threading.Event()  # set by the first stack that fails, or on an interrupt
        errors: list[BaseException] = []

        def run_stack(ax, store, progress, fed, last):
            def outputs_done():  # in the forward thread: hand the progress on, then go on
                if not last:
                    progress.detach()
                fed.set()

            try:
                return run(ax, store, progress, outputs_done)
            except BaseException as exc:
                errors.append(exc)
                stop.set()
                raise
            finally:
                fed.set()  # the next stack may start, or see the stop

        futures = {}
        pool = ThreadPoolExecutor(len(axes), thread_name_prefix="panoptem-stack")
        try:
            for k, ax in enumerate(axes):
                if stop.is_set():
                    break
                relay, fed = _StackProgress(prog, stop), threading.Event()
                futures[ax] = pool.submit(run_stack, ax, make_store(ax), relay, fed,
                                          k == len(axes) - 1)
                fed.wait()
            wait(futures.values())
        except BaseException:  # also an interrupt while waiting: the stacks stop at their next step
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True)
        if errors:
            raise errors[0]
        return {ax: f.result() for ax, f in futures.items()}

    @staticmethod
    def _class_inputs(c, thing: bool, axes, out, shape) -> list:
        """New arrays for one class's consensus inputs, one per stack: the objects of a
        thing class (int32), the mask of a stuff class (uint8)."""
        if thing:
            return [out.create(f".view_{ax}_{c}", shape, np.int32) for ax in axes]
        return [out.create(f".stuff_{ax}_{c}", shape, np.uint8) for ax in axes]

    @staticmethod
    def _consensus(views, thing: bool, p3, arr, chunks, prog) -> None:
        """One class's consensus of its three stacks into ``arr``."""
        from panoptem.inference.consensus import ortho_plane_consensus, semantic_consensus

        if thing:
            ortho_plane_consensus(views, vote_thr=p3.vote_thr, permit_one_stack=p3.permit_one_stack,
                                  out=arr, chunk_depth=chunks[0], progress=prog,
                                  min_size=p3.min_size, min_extent=p3.min_extent)
        else:
            semantic_consensus(views, vote_thr=p3.vote_thr, out=arr, chunk_depth=chunks[0],
                               progress=prog)

    def _write_stack(self, res: st.StackResult, things, p3, arr, chunks, prog):
        keep = {i: i for c in things for i in res.kept_ids(c, p3.min_size, p3.min_extent)}
        keep.update({i: i for i in res.stats if i % res.label_divisor == 0})
        if p3.max_objects == 0:  # no class offset: the stack's objects numbered 1..N
            keep = {i: k for k, i in enumerate(sorted(keep), 1)}
        _write_remapped(res.store, st.AXES[res.axis], keep, arr, np.int32, chunks, prog)

    def _write_class(self, res: st.StackResult, c, thing: bool, p3, arr, chunks, prog):
        """One class of a stack into ``arr`` (ZYX): a thing class's objects that pass the
        filters numbered 1..N, a stuff class as a 0/1 mask."""
        if thing:
            ids = res.kept_ids(c, p3.min_size, p3.min_extent)
            mapping, dtype = {i: k for k, i in enumerate(ids, 1)}, np.int32
        else:
            mapping, dtype = {c * res.label_divisor: 1}, np.uint8
        _write_remapped(res.store, st.AXES[res.axis], mapping, arr, dtype, chunks, prog)

    def _morphology(self, arr, p3: Params3D) -> None:
        """Optional erosion, dilation and hole filling, in place (whole class volume in
        memory)."""
        if not (p3.erode or p3.dilate or p3.fill_holes):
            return
        arr[:] = morphology(np.asarray(arr[:]), p3.erode, p3.dilate, p3.fill_holes)


class _StackProgress(Progress):
    """The progress of one stack among overlapping ones: passed on to the run's progress
    until :meth:`detach` (its forward passes are done and the next stack takes over), then
    only checked. It stops its stack when the run is cancelled or stopped (``stop``: another
    stack failed, or the run was interrupted)."""

    def __init__(self, main: Progress, stop: threading.Event) -> None:
        super().__init__()
        self._main, self._stop = main, stop
        self._lock = threading.Lock()
        self._attached = True

    def detach(self) -> None:
        with self._lock:
            self._attached = False

    def stage(self, name: str, total: int) -> None:
        with self._lock:
            if self._attached:
                self._main.stage(name, total)
        self.check()

    def advance(self, n: int = 1) -> None:
        with self._lock:
            if self._attached:
                self._main.advance(n)
        self.check()

    def note(self, text: str) -> None:
        with self._lock:
            if self._attached:
                self._main.note(text)

    def check(self) -> None:
        self._main.check()
        if self._stop.is_set():
            raise Cancelled("stopped with the ortho-plane run (another stack failed, or the "
                            "run was interrupted)")

    def cancel(self) -> None:
        self._main.cancel()

    @property
    def cancelled(self) -> bool:
        return self._main.cancelled or self._stop.is_set()


def morphology(labels: np.ndarray, erode: int = 0, dilate: int = 0, fill_holes: bool = False) -> np.ndarray:
    """Grey-level erosion then dilation (``n`` iterations, 3-D cross), per-slice hole filling,
    then connected components renumbered 1..N (pieces split by erosion get their own ids)."""
    import cc3d
    from scipy import ndimage

    cross = ndimage.generate_binary_structure(3, 1)
    out = labels
    for _ in range(erode):
        out = ndimage.grey_erosion(out, footprint=cross, mode="nearest")
    for _ in range(dilate):
        out = ndimage.grey_dilation(out, footprint=cross, mode="nearest")
    if fill_holes:
        out = fill_holes_2d(out)
    return cc3d.connected_components(out, connectivity=26, out_dtype=np.uint32).astype(np.int32)
