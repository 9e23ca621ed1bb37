"""Block-wise 3D inference on dask.distributed: volumes bigger than one machine.

The volume is cut into a grid of *blocks* (z-slab by y-tile by x-tile). Each block is
segmented with a margin of ``overlap`` voxels on every side (clipped at the volume's
faces) by the ordinary :class:`~panoptem.inference.volume.Engine3D`, with every 3D
parameter (stack or ortho-plane, median filter, erode, dilate, fill holes) and the size
and extent filters switched off; those are applied once the blocks are stitched. Blocks
run as dask tasks on a ``dask.distributed`` cluster: a ``LocalCluster`` of worker
processes by default, or any running scheduler. A worker loads the model once and keeps it
for all its blocks; with CUDA, worker ``k`` of a local cluster takes GPU ``k mod n``.

Stitching, per thing class:

1. **Own region.** Each block writes its own (margin-free) region of the output with its
   own objects, ids made globally unique by an offset per block, so every voxel is
   labelled by the block that saw it with the full margin of context. The block also
   records those objects over its margins, where the neighbours compare.
2. **Overlap graph.** In each block's region, its objects are compared with what the
   neighbours saw there in their margins: two objects that cover each other (their shared
   voxels are at least half of the smaller one's voxels in that region) are the same object
   and are joined (union-find), so objects that cross block faces, corners included, come
   out whole, as one object whose owner is the block holding its centre.
3. **Filters and ids.** Objects smaller than ``min_size`` voxels or thinner than
   ``min_extent`` are dropped and the rest numbered 1..N (in block order), as the
   whole-volume engine does.

Stuff classes need no stitching: each block writes its own region of the mask.

Nothing is lost when something fails. The output is an OME-Zarr store whose labels are NGFF
label images; every finished block writes its kept objects and a record under
``.panoptem_blocks`` in the store, so a run that was killed starts again with the blocks
that are not finished (the stitching passes are redone, and give the identical result). A
worker that dies is replaced by the cluster and its blocks rerun. The block records are
removed once the run is complete; the run's parameters stay in the store's attributes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import threading
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from panoptem.errors import PanoptemError
from panoptem.inference import stack as st
from panoptem.inference.engine import Params2D
from panoptem.inference.volume import Engine3D, Params3D, Result3D, _IdMap, check_volume
from panoptem.inference.zarr_store import StoreInfo, parse_chunks
from panoptem.progress import Progress, ensure_progress

__all__ = ["BlockGrid", "Cluster", "default_block_shape", "default_overlap", "segment_blocks",
           "open_volume", "is_unfinished_run", "BLOCKS_DIR"]

#: Folder in the output store holding the finished blocks' records (removed when complete).
BLOCKS_DIR = ".panoptem_blocks"
_MERGE_FRACTION = 0.5  # shared voxels / the smaller object's voxels in the overlap to join


# ---------------------------------------------------------------------------- the grid
def default_block_shape(params3d: Params3D) -> tuple[int, int, int]:
    """Blocks of 32 x 1024 x 1024 voxels for an xy stack (whole slices of most volumes up
    to 1024 wide, so the model sees them as in a whole-volume run); 192 x 384 x 384 for the
    other planes and ortho-plane, whose slices cut through z, so a block needs depth."""
    if params3d.ortho_plane or params3d.plane != "xy":
        return (192, 384, 384)
    return (32, 1024, 1024)


def default_overlap(params3d: Params3D, padding_factor: int = 16) -> tuple[int, int, int]:
    """The margin around each block, from the model's padding and the 3D filters.

    In-plane: context for the model near the block's edge, the model's padding factor held
    to 64..128 voxels (the models pool over the whole image they are given, so a block's
    slice needs real context around it), plus ``erode + dilate``. Along z for an xy stack:
    the median filter's reach (``median_size // 2``) plus 2 slices to match objects across
    the face, plus ``erode + dilate``; the other planes see z in-plane and get the in-plane
    margin.
    """
    morph = int(params3d.erode) + int(params3d.dilate)
    yx = min(max(64, int(padding_factor)), 128) + morph
    if params3d.ortho_plane or params3d.plane != "xy":
        return (yx, yx, yx)
    return (params3d.median_size // 2 + 2 + morph, yx, yx)


@dataclass(frozen=True)
class BlockGrid:
    """A (z, y, x) grid of blocks over a volume, each with a margin of ``overlap`` voxels."""

    shape: tuple
    block: tuple
    overlap: tuple

    @classmethod
    def make(cls, shape, block=None, overlap=None, params3d: Params3D | None = None,
             padding_factor: int = 16) -> BlockGrid:
        p3 = params3d or Params3D()
        block = _three(block, "block size") if block is not None else default_block_shape(p3)
        block = tuple(min(b, s) for b, s in zip(block, shape, strict=True))
        if overlap is None:  # the default margin, held to the block (a margin reaches one block)
            overlap = tuple(min(o, b) for o, b in zip(default_overlap(p3, padding_factor), block, strict=True))
        overlap = _three(overlap, "overlap", zero_ok=True)
        overlap = tuple(min(o, s) for o, s in zip(overlap, shape, strict=True))
        for axis, b, o, s in zip("zyx", block, overlap, shape, strict=True):
            if o > b and b < s:
                raise PanoptemError(
                    f"The overlap along {axis} ({o}) is larger than the block ({b}): give a "
                    "larger block size or a smaller overlap (a block's margin may reach only "
                    "into its neighbours)."
                )
            if o < 1 and b < s:
                raise PanoptemError(
                    f"The overlap along {axis} is 0: blocks need at least 1 voxel of overlap to "
                    "stitch objects across their faces."
                )
        return cls(tuple(int(s) for s in shape), block, overlap)

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(math.ceil(s / b) for s, b in zip(self.shape, self.block, strict=True))

    def indices(self) -> list[tuple[int, int, int]]:
        return list(itertools.product(*(range(n) for n in self.counts)))

    def core(self, idx) -> tuple[slice, ...]:
        return tuple(slice(i * b, min((i + 1) * b, s))
                     for i, b, s in zip(idx, self.block, self.shape, strict=True))

    def padded(self, idx) -> tuple[slice, ...]:
        return tuple(slice(max(0, c.start - o), min(s, c.stop + o))
                     for c, o, s in zip(self.core(idx), self.overlap, self.shape, strict=True))

    def neighbours(self, idx) -> list[tuple[int, int, int]]:
        """Blocks whose margins reach into the region of ``idx`` (``idx`` itself first)."""
        out = [tuple(idx)]
        for d in itertools.product((-1, 0, 1), repeat=3):
            j = tuple(i + k for i, k in zip(idx, d, strict=True))
            if j == tuple(idx) or any(not 0 <= a < n for a, n in zip(j, self.counts, strict=True)):
                continue
            if _intersect(self.core(idx), self.padded(j)) is not None:
                out.append(j)
        return out


def _three(value, what: str, zero_ok: bool = False) -> tuple[int, int, int]:
    parts = parse_chunks(value, what=f"The {what}") if not zero_ok else None
    if zero_ok:
        if isinstance(value, int):
            parts = (value,) * 3
        else:
            try:
                parts = tuple(int(v) for v in (value if isinstance(value, tuple | list)
                                               else str(value).replace(" ", "").split(",")))
            except ValueError:
                parts = ()
            parts = parts * 3 if len(parts) == 1 else parts
        if len(parts) != 3 or min(parts) < 0:
            raise PanoptemError(f"The {what} '{value}' does not parse: give one whole number or "
                                "three (z, y, x) separated by commas, none negative.")
    return tuple(int(p) for p in parts)


def _intersect(a, b):
    out = tuple(slice(max(x.start, y.start), min(x.stop, y.stop)) for x, y in zip(a, b, strict=True))
    return None if any(s.start >= s.stop for s in out) else out


def _shift(region, origin):
    return tuple(slice(s.start - o, s.stop - o) for s, o in zip(region, origin, strict=True))


def _block_name(idx) -> str:
    return "_".join(str(i) for i in idx)


# ------------------------------------------------------------------- the cluster
@dataclass(frozen=True)
class Cluster:
    """Where the blocks run: a local cluster of worker processes, or a running scheduler.

    Attributes
    ----------
    workers : int
        Worker processes of the local cluster (default: one per GPU with CUDA, else 1).
    threads_per_worker : int
        Blocks a worker runs at once (default 1; the model's own threads come on top).
    memory_limit : str or None
        Per-worker memory limit of the local cluster ("4GiB"; default: dask's "auto"). A
        worker over it is restarted and its block rerun.
    scheduler : str or None
        Address of a running scheduler (``tcp://host:8786``); the workers are its own.
    processes : bool
        Local workers in processes (default) or in threads of this process.
    timeout : str
        How long to try reaching ``scheduler`` before giving up.
    """

    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | None = None
    scheduler: str | None = None
    processes: bool = True
    timeout: str = "10s"

    def __post_init__(self) -> None:  # before any work: what dask would refuse later
        t = self.threads_per_worker
        if isinstance(t, bool) or not isinstance(t, int) or t < 1:
            raise PanoptemError(f"Give at least 1 thread per worker (got {t}).")
        if self.memory_limit not in (None, "auto"):
            from dask.utils import parse_bytes

            try:
                parse_bytes(self.memory_limit)
            except (ValueError, TypeError):
                raise PanoptemError(f"The memory limit {self.memory_limit!r} is no size; give e.g. "
                                    "8GiB or 500MB.") from None
        if self.scheduler:
            from distributed.comm.addressing import parse_address, parse_host_port

            try:
                scheme, location = parse_address(self.scheduler)
                if scheme in ("tcp", "tls"):
                    parse_host_port(location)
            except ValueError as err:
                raise PanoptemError(f"The scheduler address {self.scheduler!r} is not one dask can "
                                    f"use ({err}); give it as tcp://host:8786.") from None

    def client(self, device: str = "cpu"):
        """A ``distributed.Client`` for this cluster (closing it closes a local cluster)."""
        import logging

        from distributed import Client, LocalCluster

        if self.scheduler:
            try:
                return Client(self.scheduler, timeout=self.timeout)
            except OSError as err:
                raise PanoptemError(
                    f"Cannot reach the dask scheduler at {self.scheduler} ({err}); check the "
                    "address and that the scheduler is running."
                ) from None
        cluster = LocalCluster(n_workers=self.n_workers(device), threads_per_worker=self.threads_per_worker,
                               memory_limit=self.memory_limit or "auto", processes=self.processes,
                               dashboard_address=None, silence_logs=logging.ERROR)
        client = Client(cluster)
        client._panoptem_cluster = cluster  # closed with the client
        return client

    def n_workers(self, device: str = "cpu") -> int:
        if self.workers is not None:
            if int(self.workers) < 1:
                raise PanoptemError(f"Give at least 1 worker (got {self.workers}).")
            return int(self.workers)
        if str(device).startswith("cuda"):
            import torch

            return max(1, torch.cuda.device_count())
        return 1

    def torch_threads(self, device: str = "cpu") -> int | None:
        """Model threads per block for a local CPU cluster: the cores shared out."""
        if self.scheduler or not self.processes:
            return None
        return max(1, (os.cpu_count() or 1) // (self.n_workers(device) * self.threads_per_worker))


def _close(client) -> None:
    cluster = getattr(client, "_panoptem_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


# --------------------------------------------------------------- on the workers
_ENGINES: dict = {}
_ENGINES_LOCK = threading.Lock()


def _worker_device(device: str) -> str:
    """``cuda`` on local worker ``k`` means GPU ``k mod n``; anything else is kept."""
    if str(device) != "cuda":
        return str(device)
    import torch

    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return "cuda"
    n = torch.cuda.device_count()
    return f"cuda:{int(name) % n}" if isinstance(name, int) and n else "cuda"


def _engine(model, device: str, quantized: bool, threads: int | None) -> Engine3D:
    """This worker thread's engine. The model itself is loaded once per worker process and
    device (the loading cache), whatever the number of threads; the engines around it,
    which keep per-run timings, are one per thread."""
    key = (json.dumps(model, sort_keys=True, default=str), device, quantized, threading.get_ident())
    with _ENGINES_LOCK:
        eng = _ENGINES.get(key)
        if eng is None:
            if threads:
                import torch

                torch.set_num_threads(threads)
            eng = _ENGINES[key] = Engine3D(model, device=_worker_device(device), quantized=quantized)
    return eng


@dataclass(frozen=True)
class _Job:
    """What every block task needs (sent once per task; small)."""

    model: object
    device: str
    quantized: bool
    threads: int | None
    p2: Params2D
    p3: Params3D
    grid: BlockGrid
    store: str
    things: tuple
    stuff: tuple  # (class name, ...) of stuff classes
    value_range: tuple | None


def _region(vol, region) -> np.ndarray:
    """A region of an in-memory, zarr or dask volume, as numpy (sent with the task)."""
    part = vol[region]
    return np.asarray(part.compute() if hasattr(part, "compute") else part)


def _read(source, region) -> np.ndarray:
    if isinstance(source, _Source):
        return source.read(region)
    return np.asarray(source)


class _Source:
    """A volume that every worker opens for itself: zarr (any NGFF level), tif or npy."""

    def __init__(self, path: str, level: int = 0) -> None:
        self.path, self.level = str(path), int(level)
        self._array = None

    def __getstate__(self):
        return {"path": self.path, "level": self.level}

    def __setstate__(self, state):
        self.path, self.level, self._array = state["path"], state["level"], None

    @property
    def array(self):
        if self._array is None:
            self._array = check_volume(open_volume(self.path, self.level)[0])
        return self._array

    def read(self, region) -> np.ndarray:
        return np.asarray(self.array[region])


def _segment_block(job: _Job, idx, data) -> dict:
    """Pass 1: segment one block with its margin, keep the objects it owns, record it."""
    import zarr

    grid = job.grid
    core, pad = grid.core(idx), grid.padded(idx)
    origin = tuple(s.start for s in pad)
    counts: dict = {}
    region = _read(data, pad)
    if region is not None and region.size:
        eng = _engine(job.model, job.device, job.quantized, job.threads)
        p3 = replace(job.p3, min_size=0, min_extent=0, return_stacks=False)
        res = eng.segment(region, job.p2, p3, value_range=job.value_range)
        root = Path(job.store)
        for name in job.things:
            lab = np.asarray(res.classes[name])
            kept = _in_core(lab, core, pad)
            counts[name] = int(kept.max()) if kept.size else 0
            if counts[name]:
                target = root / BLOCKS_DIR / name / _block_name(idx)
                # what an attempt killed before its record was written left here is garbage
                shutil.rmtree(target, ignore_errors=True)
                zarr.save_array(str(target), kept, zarr_format=2)
        for name in job.stuff:
            out = zarr.open_array(str(root / "labels" / name / "0"), mode="r+")
            out[core] = np.asarray(res.classes[name])[_shift(core, origin)]
    _write_record(Path(job.store), idx, {"objects": counts})
    return counts


def _in_core(lab: np.ndarray, core, pad) -> np.ndarray:
    """The objects of a padded block that have voxels in its own region, ids 1..k, over the
    whole padded block (the margins are what the neighbours compare with)."""
    ids = np.unique(lab[_shift(core, tuple(s.start for s in pad))])
    ids = ids[ids > 0]
    lut = np.zeros(int(lab.max(initial=0)) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[lab]


def _write_record(root: Path, idx, record: dict) -> None:
    done = root / BLOCKS_DIR / "done"
    done.mkdir(parents=True, exist_ok=True)
    tmp = done / f".{_block_name(idx)}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, done / f"{_block_name(idx)}.json")


def _read_records(root: Path) -> dict:
    done = root / BLOCKS_DIR / "done"
    out = {}
    if done.is_dir():
        for f in done.glob("*.json"):
            try:
                out[tuple(int(v) for v in f.stem.split("_"))] = json.loads(f.read_text())
            except (ValueError, json.JSONDecodeError):
                continue  # a record cut short is not a finished block
    return out


def _stitch_block(job: _Job, name: str, idx, offsets: dict) -> tuple[dict, dict, dict]:
    """Pass 2: write one block's region with its own objects (ids made global), and compare
    them with the neighbours' objects in their margins over this region; return the
    overlaps, the sizes they are judged against, and each object's statistics."""
    import zarr

    grid, root = job.grid, Path(job.store)
    core = grid.core(idx)
    corigin = tuple(s.start for s in core)

    def kept(j, region):
        if not offsets.get(j, (0, 0))[1]:
            return None
        pad = grid.padded(j)
        arr = zarr.open_array(str(root / BLOCKS_DIR / name / _block_name(j)), mode="r")
        loc = np.asarray(arr[_shift(region, tuple(s.start for s in pad))]).astype(np.int64)
        loc[loc > 0] += offsets[j][0]
        return loc

    out = kept(tuple(idx), core)
    if out is None:
        out = np.zeros(tuple(s.stop - s.start for s in core), np.int64)
    pairs: dict = {}
    sizes: dict = {}
    for j in grid.neighbours(idx)[1:]:
        region = _intersect(core, grid.padded(j))
        theirs = kept(j, region)
        if theirs is None:
            continue
        mine = out[_shift(region, corigin)]
        both = (mine > 0) & (theirs > 0)
        if not both.any():
            continue
        key = (tuple(idx), j)
        for lab in (mine, theirs):
            u, c = np.unique(lab[lab > 0], return_counts=True)
            for v, n in zip(u.tolist(), c.tolist(), strict=True):
                sizes[(key, v)] = n
        u, c = np.unique(mine[both] * (1 << 32) + theirs[both], return_counts=True)
        for v, n in zip(u.tolist(), c.tolist(), strict=True):
            pairs[(key, v >> 32, v & 0xFFFFFFFF)] = n
    zarr.open_array(str(root / "labels" / name / "0"), mode="r+")[core] = out.astype(np.int32)
    stats = st._label_stats((corigin[0] + dz, out[dz]) for dz in range(out.shape[0]))
    for v in stats.values():  # rows and columns to volume coordinates
        v[3] += corigin[1]
        v[4] += corigin[1]
        v[5] += corigin[2]
        v[6] += corigin[2]
    return pairs, sizes, stats


def _relabel_block(job: _Job, name: str, idx, keys: np.ndarray, vals: np.ndarray) -> None:
    """Pass 3: the block's stitched ids to final ids (0 for objects filtered out)."""
    import zarr

    arr = zarr.open_array(str(Path(job.store) / "labels" / name / "0"), mode="r+")
    core = job.grid.core(idx)
    block = np.asarray(arr[core])
    if not block.any():
        return
    arr[core] = _IdMap(keys, vals)(block)


def _block_range(data) -> tuple[float, float] | None:
    from panoptem.inference import preprocess as pre

    region = _read(data[0], data[1]) if isinstance(data, tuple) else np.asarray(data)
    return pre.intensity_range(region)


# --------------------------------------------------------------- the driver
def open_volume(path, level: int = 0):
    """A (Z, Y, X) volume read lazily from a path, with its voxel size and origin.

    zarr arrays, OME-Zarr images (NGFF 0.4 and 0.5, any pyramid ``level``), ``.npy``
    (memory-mapped) and ``.tif`` files (as a zarr view of the file; uncompressed or tiled
    files are read block by block).
    """
    from panoptem import ngff

    path = Path(path)
    suffix = path.suffix.lower()
    if not path.exists():
        raise PanoptemError(f"{path} does not exist; give the path of a zarr, OME-Zarr, tif or npy volume.")
    if suffix == ".npy":
        return np.load(path, mmap_mode="r"), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    if suffix in (".tif", ".tiff"):
        import tifffile
        import zarr

        try:
            store = tifffile.imread(str(path), aszarr=True)
            arr = zarr.open(store, mode="r")
        except Exception as err:
            raise PanoptemError(f"Cannot read {path} as a tif volume ({err}).") from None
        if hasattr(arr, "array_keys"):  # a pyramid: its first level
            arr = arr[sorted(arr.array_keys())[0]]
        return arr, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    if path.is_dir():
        return ngff.open_image(path, level)
    raise PanoptemError(f"{path}: give a zarr / OME-Zarr folder, a .tif or a .npy volume.")


def _run_key(model_name: str, model_file, p2: Params2D, p3: Params3D, grid: BlockGrid, vshape) -> dict:
    run = {"model": model_name or str(model_file), "params2d": asdict(p2), "params3d": asdict(p3),
           "shape": list(vshape), "block": list(grid.block), "overlap": list(grid.overlap)}
    digest = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return {**run, "key": digest}


def segment_blocks(model, volume, params2d: Params2D | None = None,
                   params3d: Params3D | None = None, *, output, block_shape=None, overlap=None,
                   mask=None, level: int = 0, cluster: Cluster | None = None, client=None,
                   device: str = "cpu", quantized: bool = False,
                   store_info: StoreInfo | None = None, overwrite: bool = False,
                   progress: Progress | None = None) -> Result3D:
    """Segment a (Z, Y, X) volume block by block on dask.distributed into an OME-Zarr store.

    Parameters
    ----------
    model : str or dict
        Registered model name or config (loaded once per worker).
    volume : str / Path, ndarray or zarr array
        A path (zarr, OME-Zarr at pyramid ``level``, tif, npy) is opened by each worker for
        itself and read block by block; an in-memory array is sent block by block.
    params2d, params3d : the 2D and 3D parameters of the 3D widget (every one applies;
        ``return_stacks`` is not available block-wise).
    output : str or Path
        The OME-Zarr store to write (``.zarr``). A store holding an unfinished block run with
        the same parameters is resumed; a finished one, or anything else, is refused unless
        ``overwrite``.
    block_shape, overlap : int or (z, y, x), optional
        Block size and the margin around each block, in voxels (defaults:
        :func:`default_block_shape`, :func:`default_overlap`).
    mask : array-like or path, optional
        Foreground mask at any resolution (its shape a scaled-down volume's); blocks whose
        region holds no foreground are skipped.
    cluster : Cluster, optional
        Where to run (default: a local cluster, see :class:`Cluster`). ``client`` instead
        uses a ``distributed.Client`` that the caller owns.
    device, quantized : the model's device on each worker and its int8 version on CPU.
    store_info : image name, voxel size and origin for napari (default from the store name).

    Returns
    -------
    Result3D with ``classes`` the level-0 zarr arrays of the label images.
    """
    from panoptem import ngff
    from panoptem.loading import resolve_config

    prog = ensure_progress(progress)
    p3 = (params3d or Params3D()).validated()
    if p3.return_stacks:
        raise PanoptemError("'Return xy, xz, yz stacks' is not available block-wise: the stacks "
                            "are per block. Switch it off, or run without blocks.")
    p2 = replace(params2d or Params2D(), max_objects=p3.max_objects, tile_size=0,
                 fill_holes=False).validated()
    out_path = Path(output)
    if out_path.suffix.lower() != ".zarr":
        raise PanoptemError(f"Block-wise output is an OME-Zarr store: give a path ending in .zarr (got '{out_path}').")
    on_disk = _zarr_path(volume)
    if on_disk is not None and level == 0:  # a zarr array on disk: workers open it themselves
        volume = on_disk
    if isinstance(volume, str | Path):
        source = _Source(volume, level)  # the workers open it again for themselves
        opened, scale, translate = open_volume(volume, level)
        vol = check_volume(opened)
    else:
        source, vol = None, check_volume(volume)
        scale, translate = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    shape = tuple(int(s) for s in vol.shape)
    model_name, cfg = resolve_config(model)
    padding = int(cfg.get("padding_factor", 16))
    grid = BlockGrid.make(shape, block_shape, overlap, p3, padding)
    class_names = {int(k): str(v) for k, v in cfg["class_names"].items()}
    labels = [int(c) for c in cfg.get("labels", class_names)]
    thing_ids = set() if p2.semantic_only else {int(c) for c in cfg.get("thing_list", [])}
    things = tuple(class_names.get(c, str(c)) for c in labels if c in thing_ids)
    stuff = tuple(class_names.get(c, str(c)) for c in labels if c not in thing_ids)
    run = _run_key(model_name, cfg.get("model"), p2, p3, grid, shape)
    info = store_info or StoreInfo(out_path.name[:-5] if out_path.name.lower().endswith(".zarr") else out_path.name,
                                   scale=scale, translate=translate)
    mask_arr = _open_mask(mask)

    _check_store(out_path, run, overwrite)
    cl = cluster or Cluster()
    owns_client = client is None
    client = client or cl.client(device)
    try:
        root = _open_store(out_path, run, overwrite, info.image)
        chunks = tuple(math.gcd(b, c) for b, c in zip(grid.block, parse_chunks(p3.chunk_size, shape), strict=True))
        for name in things:
            ngff.create_label_image(root, name, shape, "int32", chunks)
        for name in stuff:
            ngff.create_label_image(root, name, shape, "uint8", chunks)
        value_range = _value_range(client, source, vol, grid, root, prog)
        job = _Job(model, str(device), bool(quantized), cl.torch_threads(device) if owns_client else None,
                   p2, p3, grid, str(out_path), things, stuff, value_range)
        records = _read_records(out_path)
        todo = [i for i in grid.indices() if i not in records]
        skipped = [i for i in todo if mask_arr is not None and not _has_foreground(mask_arr, grid, i)]
        for i in skipped:
            _write_record(out_path, i, {"objects": {}, "skipped": True})
        todo = [i for i in todo if i not in set(skipped)]
        prog.stage("blocks", len(grid.indices()))
        if len(todo) < len(grid.indices()):
            prog.advance(len(grid.indices()) - len(todo))
        # a path is opened by the workers; an in-memory or dask volume's blocks are read
        # here, so blocks are submitted a few at a time either way
        _stream(client, todo, lambda i: client.submit(
            _segment_block, job, i, source if source is not None else _region(vol, grid.padded(i)),
            pure=False), prog)
        records = _read_records(out_path)
        for name in things:
            _stitch_class(client, job, name, records, prog)
        for name in (*things, *stuff):
            ngff.finish_label_image(root, name, scale=info.scale, translate=info.translate,
                                    progress=prog, run_level=_level_on(client))
        root.attrs["panoptem"] = {**info.as_attrs(), **_public(run), "complete": True,
                                  "blocks_skipped": len([r for r in records.values() if r.get("skipped")])}
        shutil.rmtree(out_path / BLOCKS_DIR, ignore_errors=True)
    finally:
        if owns_client:
            _close(client)
    import zarr

    classes = {n: zarr.open_array(str(out_path / "labels" / n / "0"), mode="r+") for n in (*things, *stuff)}
    ordered = {class_names.get(c, str(c)): classes[class_names.get(c, str(c))] for c in labels}
    return Result3D(classes=ordered, zarr_path=str(out_path))


def _public(run: dict) -> dict:
    return {"model": run["model"], "params2d": run["params2d"], "params3d": run["params3d"],
            "blocks": {"block": run["block"], "overlap": run["overlap"], "key": run["key"]}}


def _check_store(path: Path, run: dict, overwrite: bool) -> None:
    """Refuse, before any work, an output that exists and is not an unfinished block-wise
    run with the same parameters (unless ``overwrite``)."""
    if not path.exists() or overwrite:
        return
    if not is_unfinished_run(path):
        raise PanoptemError(
            f"{path} exists; choose another output or overwrite it (nothing was written)."
        )
    if _store_attrs(path)["panoptem"]["blocks"].get("key") != run["key"]:
        raise PanoptemError(
            f"{path} holds an unfinished block-wise run with other parameters, model, volume "
            "or blocks: run again with the same ones to resume it, or overwrite it to start "
            "again (nothing was written)."
        )


def _open_store(path: Path, run: dict, overwrite: bool, image: str):
    """Create the store (replacing a zarr store when ``overwrite``), or open the unfinished
    run it holds, and mark it unfinished with this run's parameters."""
    from panoptem import ngff

    resume = path.exists() and not overwrite
    root = ngff.create_labels_store(path, image, overwrite=not resume and overwrite)
    attrs = dict(root.attrs.get("panoptem", {}))
    attrs.update({**_public(run), "complete": False})
    root.attrs["panoptem"] = attrs
    return root


def is_unfinished_run(path) -> bool:
    """Whether ``path`` holds a block-wise run that has not finished (one to resume)."""
    path = Path(path)
    prev = ((_store_attrs(path) or {}).get("panoptem") or {}) if path.is_dir() else {}
    return bool(prev.get("blocks")) and not prev.get("complete")


def _store_attrs(path: Path) -> dict | None:
    try:
        import zarr

        return dict(zarr.open_group(str(path), mode="r").attrs)
    except Exception:
        return None


def _open_mask(mask):
    if mask is None:
        return None
    if isinstance(mask, str | Path):
        mask = open_volume(mask)[0]
    if len(mask.shape) != 3:
        raise PanoptemError(f"The foreground mask must be 3D (Z, Y, X); got shape {tuple(mask.shape)}.")
    return mask


def _has_foreground(mask, grid: BlockGrid, idx) -> bool:
    """Any foreground in the mask's voxels that cover block ``idx`` (mask at any scale)."""
    region = tuple(slice(int(math.floor(c.start * m / s)), max(int(math.ceil(c.stop * m / s)), 1))
                   for c, m, s in zip(grid.core(idx), mask.shape, grid.shape, strict=True))
    return bool(np.asarray(mask[region]).any())


def _value_range(client, source, vol, grid: BlockGrid, root, prog: Progress):
    """The whole volume's intensity range (non-uint8 volumes), read block by block once."""
    if np.dtype(vol.dtype) == np.uint8:
        return None
    cached = root.attrs.get("panoptem", {}).get("value_range")
    if cached:
        return tuple(cached)
    idx = grid.indices()
    prog.stage("intensity range", len(idx))
    futures = [client.submit(_block_range, (source, grid.core(i)) if source is not None else _region(vol, grid.core(i)),
                             pure=False) for i in idx]
    ranges = _gather(client, futures, prog)
    lo, hi = min(r[0] for r in ranges), max(r[1] for r in ranges)
    attrs = dict(root.attrs["panoptem"])
    attrs["value_range"] = [lo, hi]
    root.attrs["panoptem"] = attrs
    return lo, hi


def _gather(client, futures, prog: Progress) -> list:
    """Wait for ``futures``, advancing the progress per finished one; cancel on request."""
    from distributed import as_completed

    results = {}
    try:
        for fut in as_completed(futures):
            results[fut.key] = fut.result()
            prog.advance()
    except BaseException:
        client.cancel(futures)
        raise
    return [results[f.key] for f in futures]


def _level_on(client):
    """Write a pyramid level's chunks as dask tasks (the levels one after another)."""
    from panoptem import ngff

    def run(source, target, regions, fz, prog):
        _gather(client, [client.submit(ngff.downsample_region, source, target, r, fz, pure=False)
                         for r in regions], prog)

    return run


def _stream(client, items, submit, prog: Progress) -> None:
    """Submit ``submit(item)`` for each item, keeping twice the cluster's threads in flight
    (so the blocks of a volume read here are not all held in memory at once)."""
    from distributed import as_completed

    window = max(2, 2 * sum(client.nthreads().values()))
    pending = iter(items)
    sent = [submit(i) for i in itertools.islice(pending, window)]
    done = as_completed(sent, loop=client.loop)
    try:
        for fut in done:
            fut.result()
            prog.advance()
            nxt = next(pending, None)
            if nxt is not None:
                sent.append(submit(nxt))
                done.add(sent[-1])
    except BaseException:
        client.cancel(sent)
        raise


def _zarr_path(volume) -> Path | None:
    """The folder of a zarr array stored on the local disk, else None."""
    root = getattr(getattr(volume, "store", None), "root", None)
    path = getattr(volume, "path", None)
    if root is None or path is None or not hasattr(volume, "chunks"):
        return None
    folder = Path(str(root)) / str(path)
    return folder if folder.is_dir() else None


def _add_stats(table: dict, key, row) -> None:
    """Add an object's [voxels, z0, z1, y0, y1, x0, x1] to ``table[key]`` (sum, box union)."""
    cur = table.get(key)
    if cur is None:
        table[key] = list(row)
        return
    cur[0] += row[0]
    for a in (1, 3, 5):
        cur[a] = min(cur[a], row[a])
        cur[a + 1] = max(cur[a + 1], row[a + 1])


def _stitch_class(client, job: _Job, name: str, records: dict, prog: Progress) -> None:
    grid = job.grid
    offsets, total = {}, 0
    for i in grid.indices():
        n = int(records.get(i, {}).get("objects", {}).get(name, 0))
        offsets[i] = (total, n)
        total += n
    if total > np.iinfo(np.int32).max:
        raise PanoptemError("More than 2**31 objects before stitching; use larger blocks.")
    prog.stage(f"stitching {name}", len(offsets))
    futures = [client.submit(_stitch_block, job, name, i, {j: offsets[j] for j in grid.neighbours(i)},
                             pure=False) for i in grid.indices()]
    parts = _gather(client, futures, prog)
    # the overlap graph: join objects of two blocks that cover each other
    sizes: dict = {}
    pairs: dict = {}
    stats: dict = {}
    per_block: list = []
    for p, s, t in parts:
        for k, v in s.items():
            sizes[k] = sizes.get(k, 0) + v
        for k, v in p.items():
            pairs[k] = pairs.get(k, 0) + v
        for gid, row in t.items():
            _add_stats(stats, gid, row)
        per_block.append(sorted(t))
    parent = {}

    def find(x):
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for (key, a, b), n in pairs.items():
        if n >= _MERGE_FRACTION * min(sizes[(key, a)], sizes[(key, b)]):
            ra, rb = find(a), find(b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    merged: dict = {}
    for gid, row in stats.items():
        _add_stats(merged, find(gid), row)
    p3 = job.p3
    kept = sorted(r for r, (n, z0, z1, y0, y1, x0, x1) in merged.items()
                  if n >= p3.min_size and min(z1 - z0, y1 - y0, x1 - x0) + 1 >= p3.min_extent)
    final = {r: k for k, r in enumerate(kept, 1)}
    prog.stage(f"numbering {name}", len(per_block))
    futures = []
    for i, gids in zip(grid.indices(), per_block, strict=True):
        keys = np.array(gids, dtype=np.int64)
        vals = np.array([final.get(find(g), 0) for g in gids], dtype=np.int32)
        futures.append(client.submit(_relabel_block, job, name, i, keys, vals, pure=False))
    _gather(client, futures, prog)

