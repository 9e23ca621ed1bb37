"""Multi-process (multi-GPU) 3D inference: one process per device, the same result as one.

:func:`segment_volume_distributed` starts one process per device (torch.multiprocessing,
spawn) joined in a torch.distributed group (NCCL when every device is a distinct GPU, else
gloo) on ``tcp://127.0.0.1:<free port>``. Slices of each axis are dealt round-robin: at
step ``s`` rank ``r`` runs the model on slice ``s * W + r`` (ranks past the end repeat the
last slice, which rank 0 drops). ``all_gather`` brings every step's outputs to rank 0,
which feeds them in slice order through ``outputs_for`` into the ordinary
:meth:`Engine3D.segment <panoptem.inference.volume.Engine3D.segment>`: median filter,
post-processing, matching, filters, consensus and zarr writing are the very same code, so
the arrays equal those of a single-process run. Before each step rank 0 broadcasts
``[continue, axis, step]``; ``continue = 0`` (sent once the last model outputs are in, or
when rank 0 fails or is cancelled) ends the other ranks.
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from panoptem.errors import Cancelled, PanoptemError
from panoptem.inference import preprocess as pre
from panoptem.inference import stack as st
from panoptem.inference.engine import Engine2D, Params2D
from panoptem.inference.volume import Engine3D, Params3D, Result3D, check_volume
from panoptem.inference.zarr_store import StoreInfo
from panoptem.progress import Progress, ensure_progress

__all__ = ["segment_volume_distributed"]

_GRACE_S = 30.0  # after a failure, how long the other ranks get to exit before termination
_COLLECTIVE_TIMEOUT = timedelta(hours=4)  # ranks wait this long for rank 0 between steps


class _PeerFailed(Exception):
    """Rank 0 stops because another rank failed (that rank reports its own error)."""


@dataclass(frozen=True)
class _Job:
    model: object
    quantized: bool
    devices: tuple
    backend: str
    init_method: str
    source: tuple  # ("zarr", store root, array path) | ("npy", path) | ("tif", path)
    p2: Params2D
    p3: Params3D
    zarr_path: str | None
    out_dir: str
    threads: int | None
    store_info: StoreInfo | None = None


def segment_volume_distributed(model, volume, params2d: Params2D | None = None,
                               params3d: Params3D | None = None, *, devices, zarr_path=None,
                               store_info: StoreInfo | None = None,
                               progress: Progress | None = None, quantized: bool = False,
                               threads: int | None = None) -> Result3D:
    """Segment a (Z, Y, X) volume with one process per device; same result as :class:`Engine3D`.

    Parameters
    ----------
    model : str or dict
        A registered model name or a config dict (sent to every process).
    volume : ndarray, zarr array, dask array, or str / Path
        A path to a zarr array, a ``.tif`` / ``.tiff`` (read whole by every process) or a
        ``.npy`` file (memory-mapped) is cheapest. A zarr array on a local folder is opened
        by path in each process; a numpy or dask array (or zarr in memory) is copied once
        into a temporary ``.npy`` file that the processes memory-map.
    params2d, params3d : as :meth:`Engine3D.segment`.
    devices : list of str
        One process per entry, e.g. ``["cuda:0", "cuda:1"]`` or ``["cpu", "cpu"]``; at least two.
    zarr_path : str or Path, optional
        Rank 0 writes the results into this zarr group (the arrays come back opened from it).
    store_info : StoreInfo, optional
        As :meth:`Engine3D.segment`.
    progress : Progress, optional
        Receives rank 0's stages and steps; its ``cancel()`` (from any thread) stops the run.
    quantized : bool
        Use the config's int8 model on CPU processes.
    threads : int, optional
        torch threads of each CPU process; default: the cores shared among them.

    Returns
    -------
    Result3D
        As :meth:`Engine3D.segment`; numpy arrays, or zarr arrays with ``zarr_path``.

    Raises
    ------
    PanoptemError
        Fewer than two devices, an unavailable device, or any rank's PanoptemError (its
        message). Other failures in a rank raise RuntimeError with the rank's traceback.
    Cancelled
        ``progress.cancel()`` was called before rank 0 finished.

    Notes
    -----
    The processes are spawned: a script calling this needs ``if __name__ == "__main__":``.
    Each process imports torch and loads the model (seconds), so small volumes are faster
    in one process. Only rank 0 post-processes; the others only run the model.
    """
    import torch.multiprocessing as tmp

    devs = _check_devices(devices)
    p3 = (params3d or Params3D()).validated()
    p2 = replace(params2d or Params2D(), max_objects=p3.max_objects, tile_size=0,
                 fill_holes=False).validated()
    gpus = [d for d in devs if d.startswith("cuda")]
    backend = "nccl" if len(gpus) == len(devs) == len(set(devs)) else "gloo"
    if threads is None and len(gpus) < len(devs):
        threads = max(1, (os.cpu_count() or 1) // (len(devs) - len(gpus)))
    prog = ensure_progress(progress)
    _prefetch(model, quantized and len(gpus) < len(devs), prog)
    out_dir = Path(tempfile.mkdtemp(prefix="panoptem-mp-"))
    ctx = tmp.get_context("spawn")
    messages, cancel = ctx.Queue(), ctx.Event()
    procs = []
    try:
        job = _Job(model, bool(quantized), tuple(devs), backend, f"tcp://127.0.0.1:{_free_port()}",
                   _source(volume, out_dir), p2, p3, None if zarr_path is None else str(zarr_path),
                   str(out_dir), threads, store_info)
        procs = [ctx.Process(target=_worker, args=(r, job, messages, cancel), daemon=True,
                             name=f"panoptem-rank{r}") for r in range(len(devs))]
        for p in procs:
            p.start()
        done, errors = _wait(procs, messages, cancel, prog)
        if done is not None:
            return _load(done, out_dir)
        _raise(errors, procs, devs, prog)
    finally:
        cancel.set()  # ranks still running here (parent interrupted, a hung rank) stop or end
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)
        messages.close()
        shutil.rmtree(out_dir, ignore_errors=True)


def _check_devices(devices) -> list[str]:
    from panoptem.loading import resolve_device

    devs = [devices] if isinstance(devices, str) else list(devices)
    if len(devs) < 2:
        raise PanoptemError(f"Multi-device inference needs at least two devices (got {devs}): list "
                            "them (--devices cuda:0,cuda:1), or run on one device (--device, Engine3D).")
    return [str(resolve_device(d)) for d in devs]  # PanoptemError for unavailable CUDA and bad names


def _prefetch(model, quantized: bool, prog: Progress) -> None:
    """Check the config and download the model file(s) once, before the ranks load them."""
    from panoptem import registry
    from panoptem.loading import resolve_config

    cfg = resolve_config(model)[1]
    registry.fetch_file(cfg["model"], known_hash=cfg.get("model_hash"), progress=prog)
    if quantized and cfg.get("model_quantized"):
        try:  # an unusable int8 file falls back to the float model in the ranks, with a warning
            registry.fetch_file(cfg["model_quantized"], cfg.get("model_quantized_hash"), prog)
        except PanoptemError:
            pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _source(volume, out_dir: Path) -> tuple:
    """What the ranks open: a path where possible, else a temporary ``.npy`` copy."""
    if isinstance(volume, str | os.PathLike):
        path = Path(volume)
        if not path.exists():
            raise PanoptemError(f"No such volume: {path}")
        suffix = path.suffix.lower()
        if suffix in (".tif", ".tiff", ".npy"):
            return ("tif" if suffix != ".npy" else "npy", str(path))
        return ("zarr", str(path), "")
    root = getattr(getattr(volume, "store", None), "root", None)
    if type(volume).__module__.startswith("zarr") and root is not None:
        check_volume(volume)
        return ("zarr", str(root), str(getattr(volume, "path", "") or ""))
    if hasattr(volume, "compute"):
        volume = volume.compute()
    arr = check_volume(np.asarray(volume))
    np.save(out_dir / "volume.npy", arr)
    return ("npy", str(out_dir / "volume.npy"))


def _open(source: tuple):
    if source[0] == "npy":
        return np.load(source[1], mmap_mode="r")
    if source[0] == "tif":
        from panoptem.io import read_image

        return read_image(source[1])
    import zarr

    try:
        return zarr.open_array(store=source[1], path=source[2], mode="r")
    except Exception as err:
        raise PanoptemError(f"Cannot open {source[1]} as a zarr array ({err}).") from None


def _wait(procs, messages, cancel, prog: Progress):
    """Relay rank 0's progress until every rank ended; returns (done payload, errors)."""
    done, errors, deadline, ended = None, [], None, False
    while True:
        if prog.cancelled:
            cancel.set()
        try:
            msg = messages.get(timeout=0.1 if ended else 0.05)
        except queue.Empty:
            if ended:  # and every message sent before the last rank exited is read
                return done, errors
            if deadline is None and (errors or any(p.exitcode not in (None, 0) for p in procs)):
                deadline = time.monotonic() + _GRACE_S  # then the others get a grace period
            ended = not any(p.is_alive() for p in procs) or (
                deadline is not None and time.monotonic() > deadline)
            continue
        if msg[0] == "done":
            done = msg[1]
        elif msg[0] == "error":
            errors.append(msg[1:])
        else:
            try:
                prog.stage(*msg[1:]) if msg[0] == "stage" else prog.advance(msg[1])
            except Cancelled:
                cancel.set()


def _raise(errors, procs, devs, prog: Progress):
    order = ("panoptem", "other", "cancelled")  # a rank's own error before any consequence
    errors = sorted((e for e in errors if e[1] != "peer"), key=lambda e: order.index(e[1]))
    if errors:
        rank, kind, text = errors[0]
        if kind == "other":
            raise RuntimeError(f"multi-process inference failed on rank {rank} ({devs[rank]}):\n{text}")
        raise (PanoptemError if kind == "panoptem" else Cancelled)(text)
    for r, p in enumerate(procs):
        if p.exitcode not in (None, 0):
            raise PanoptemError(f"The process of rank {r} ({devs[r]}) exited with code {p.exitcode}.")
    raise Cancelled("cancelled") if prog.cancelled else PanoptemError(
        "multi-process inference ended without a result.")


def _load(done: dict, out_dir: Path) -> Result3D:
    if done["zarr_path"] is not None:
        import zarr

        def get(name):
            path = Path(done["zarr_path"]) / name
            return zarr.open_array(str(path), mode="r+" if os.access(path, os.W_OK) else "r")
    else:
        def get(name):
            return np.load(out_dir / name)
    return Result3D({c: get(f) for c, f in done["classes"]}, {a: get(f) for a, f in done["stacks"]},
                    done["zarr_path"])


# ---------------------------------------------------------------------- in the ranks
class _RankProgress(Progress):
    """Rank 0's progress: sends stages and steps to the parent, obeys its cancel event."""

    def __init__(self, messages, cancel) -> None:
        super().__init__()
        self._messages, self._remote, self._sent = messages, cancel, 0

    def check(self) -> None:
        if self._remote.is_set():
            self.cancel()
        super().check()

    def on_stage(self, name: str, total: int) -> None:
        self._sent = 0
        self._messages.put(("stage", name, total))

    def on_advance(self, done: int, total: int) -> None:
        self._messages.put(("advance", done - self._sent))
        self._sent = done


def _report(messages, rank: int, err: BaseException) -> None:
    if isinstance(err, _PeerFailed | Cancelled | PanoptemError):
        kind = {_PeerFailed: "peer", Cancelled: "cancelled"}.get(type(err), "panoptem")
        messages.put(("error", rank, kind, str(err)))
    else:
        messages.put(("error", rank, "other", "".join(traceback.format_exception(err))))


def _worker(rank: int, job: _Job, messages, cancel) -> None:
    import torch.distributed as dist

    if job.threads and job.devices[rank] == "cpu":
        torch.set_num_threads(job.threads)
    joined = False
    try:
        if job.backend == "nccl":
            torch.cuda.set_device(torch.device(job.devices[rank]))
        dist.init_process_group(job.backend, init_method=job.init_method, rank=rank,
                                world_size=len(job.devices), timeout=_COLLECTIVE_TIMEOUT)
        joined = True
        _Rank(rank, job, messages).run(cancel)
    except BaseException as err:  # the parent raises it
        _report(messages, rank, err)
    finally:
        if joined:
            dist.destroy_process_group()
    # all is written and reported: skip torch's slow interpreter teardown (~2 s)
    messages.close()
    messages.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class _Rank:
    """One process: its slice of the volume, its model, its part of each step."""

    def __init__(self, rank: int, job: _Job, messages) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world, self.job, self.messages = rank, len(job.devices), job, messages
        self.comm = torch.device(job.devices[rank] if job.backend == "nccl" else "cpu")
        self.stopped = False

    def run(self, cancel) -> None:
        err = None
        try:  # every rank opens the volume and model and computes the same value range
            self.volume = check_volume(_open(self.job.source))
            self.engine = Engine2D(self.job.model, self.job.devices[self.rank], self.job.quantized)
            self.vr = st.volume_intensity_range(self.volume)
        except Exception as e:
            err = e
        ok = torch.tensor([int(err is None)], device=self.comm)
        self.dist.all_reduce(ok, op=self.dist.ReduceOp.MIN)
        if err is not None:
            raise err
        if ok.item() and self.rank == 0:
            self.lead(cancel)
        elif ok.item():
            self.follow()

    def _control(self, flag: int, axis: int = 0, step: int = 0) -> None:
        if not self.stopped:
            self.dist.broadcast(torch.tensor([flag, axis, step], dtype=torch.int64, device=self.comm), 0)
            self.stopped = not flag

    def lead(self, cancel) -> None:
        p3 = self.job.p3
        axes = ["xy", "xz", "yz"] if p3.ortho_plane else [p3.plane]

        def outputs_for(ax):
            a, n = st.AXES[ax], self.volume.shape[st.AXES[ax]]
            steps = -(-n // self.world)
            for s in range(steps):
                self._control(1, a, s)
                outs = self.step(a, s)
                if ax == axes[-1] and s == steps - 1:
                    self._control(0)  # all model outputs are in: release the other ranks
                yield from outs[: n - s * self.world]

        prog = _RankProgress(self.messages, cancel)
        try:
            if cancel.is_set():
                raise Cancelled("cancelled before inference started")
            res = Engine3D(self.engine).segment(self.volume, self.job.p2, p3, zarr_path=self.job.zarr_path,
                                                store_info=self.job.store_info, progress=prog,
                                                outputs_for=outputs_for)
        finally:
            self._control(0)
        self.messages.put(("done", self._save(res)))

    def follow(self) -> None:
        ctrl = torch.zeros(3, dtype=torch.int64, device=self.comm)
        while True:
            self.dist.broadcast(ctrl, 0)
            flag, axis, step = ctrl.tolist()
            if not flag:
                return
            self.step(axis, step)

    def step(self, axis: int, step: int):
        """Model outputs of slice ``step * W + rank``; rank 0 gets everyone's, in rank order."""
        i = min(step * self.world + self.rank, self.volume.shape[axis] - 1)
        header, flat, err = torch.zeros(6, dtype=torch.int64), None, None
        try:
            img = pre.check_image_2d(st.read_slice(self.volume, axis, i), f"slice {i}")
            probs, ctr, off = self.engine.outputs(pre.to_unit_range(img, self.vr), self.job.p2)
            flat = torch.cat([t.reshape(-1).float() for t in (probs, ctr, off)]).to(self.comm)
            header = torch.tensor([1, *probs.shape, *ctr.shape], dtype=torch.int64)
        except Exception as e:
            err = e
        headers = [torch.zeros(6, dtype=torch.int64, device=self.comm) for _ in range(self.world)]
        self.dist.all_gather(headers, header.to(self.comm))
        heads = [h.tolist() for h in headers]
        if err is not None or not all(h[0] for h in heads) or any(h != heads[0] for h in heads):
            if self.rank == 0:
                if err is None and all(h[0] for h in heads):
                    err = RuntimeError(f"the ranks' model outputs differ in shape: {heads}")
                raise err or _PeerFailed("another rank failed")
            if err is not None:
                _report(self.messages, self.rank, err)
            return None
        bufs = [torch.empty_like(flat) for _ in range(self.world)]
        self.dist.all_gather(bufs, flat)
        if self.rank:
            return None
        c, h, w, hh, ww = heads[0][1:]
        dev = self.engine.device
        return [(p.view(c, h, w), q.view(hh, ww), o.view(2, hh, ww)) for p, q, o in
                (torch.split(b.to(dev), [c * h * w, hh * ww, 2 * hh * ww]) for b in bufs)]

    def _save(self, res: Result3D) -> dict:
        """Where the parent finds the arrays: zarr names, or ``.npy`` files in ``out_dir``."""
        if self.job.zarr_path is not None:
            return {"zarr_path": res.zarr_path, "classes": [(c, c) for c in res.classes],
                    "stacks": [(a, f"panoptic_{a}") for a in res.stacks]}
        files = {"zarr_path": None, "classes": [], "stacks": []}
        for kind, arrays in (("classes", res.classes), ("stacks", res.stacks)):
            for k, (name, arr) in enumerate(arrays.items()):
                np.save(Path(self.job.out_dir) / f"{kind}{k}.npy", np.asarray(arr))
                files[kind].append((name, f"{kind}{k}.npy"))
        return files
