"""The 2D inference engine: one image (or a stack of them) in, a panoptic label image out.

:class:`Engine2D` holds a loaded model (cached by the registry per model, device and
quantized flag, so building engines is cheap) and runs every 2D parameter of the
"2D Inference (Parameter Testing)" widget. The same engine serves the widget, batch mode,
the command line and, slice by slice, 3D inference.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from panoptem._params import as_whole, divisor_count, param, whole_count
from panoptem.errors import PanoptemError
from panoptem.inference import preprocess as pre
from panoptem.inference.postprocess import (
    connected_panoptic_codes,
    fill_holes,
    number_from_one,
    semantic_probabilities,
)
from panoptem.inference.tiling import segment_tiled, tile_grid
from panoptem.progress import Progress, ensure_progress

__all__ = ["Params2D", "Engine2D", "DOWNSAMPLING_FACTORS", "WORKING_DIVISOR"]

DOWNSAMPLING_FACTORS = (1, 2, 4, 8, 16, 32, 64)

#: The label divisor used inside the engine when "Max objects per class" is 0 (no class
#: offset: the results are then numbered 1..N, as the original's best practices describe
#: for models whose label divisor is None).
WORKING_DIVISOR = 2**20


@dataclass(frozen=True)
class Params2D:
    """The 2D parameters, named and defaulted as the original widget.

    Attributes
    ----------
    downsampling : int
        "Image Downsampling", one of 1, 2, 4, ..., 64. The image is shrunk by this factor
        before the model and the semantic map is rendered back at full size.
    confidence_thr : float
        "Segmentation Confidence Thr" (0..1, default 0.5).
    center_confidence_thr : float
        "Center Confidence Thr" (0..1, default 0.1).
    min_distance : int
        "Centers Min Distance" in heat-map pixels (default 3).
    fine_boundaries : bool
        "Fine boundaries": group pixels at the model input resolution instead of 1/4.
    semantic_only : bool
        "Semantic only": no instances, one label per class.
    fill_holes : bool
        "Fill holes in segmentation": fill each object's own holes.
    max_objects : int
        "Max objects per class": the label divisor (id = class * max_objects + k). 0 means
        no class offset: the objects are numbered 1..N (all classes together).
    tile_size : int
        "Tile size": 0 for no tiling; otherwise tiles of this many pixels per side.

    Each field also carries the original widget's label, range and choices
    (:func:`panoptem._params.param_info`), which the widgets and the CLI read.
    """

    downsampling: int = param(1, "Image Downsampling", choices=DOWNSAMPLING_FACTORS,
                              help="Downsampling factor to apply before inference")
    confidence_thr: float = param(0.5, "Segmentation Confidence Thr", min=0.1, max=0.9,
                                  step=0.1, help="Minimum probability for a pixel to be "
                                  "segmented")
    center_confidence_thr: float = param(0.1, "Center Confidence Thr", min=0.05, max=0.9,
                                         step=0.05, help="Minimum value of an object centre "
                                         "in the centre heat map")
    min_distance: int = param(3, "Centers Min Distance", min=1, max=35, step=1,
                              help="Minimum distance between object centres (heat-map pixels)")
    fine_boundaries: bool = param(False, "Fine boundaries",
                                  help="Finer boundaries between objects")
    semantic_only: bool = param(False, "Semantic only",
                                help="Only run semantic segmentation for all classes.")
    fill_holes: bool = param(False, "Fill holes in segmentation",
                             help="Fill holes inside each object.")
    max_objects: int = param(10000, "Max objects per class",
                             help="Maximum number of objects per class: the label divisor "
                                  "(id = class x divisor + k); 0 numbers objects 1..N.")
    tile_size: int = param(0, "Tile size", min=0, max=128000, step=1280,
                           help="Tile size for inference; the whole image is segmented if 0")

    @property
    def label_divisor(self) -> int:
        """The divisor the engine works with (:data:`WORKING_DIVISOR` for max_objects 0)."""
        return int(self.max_objects) or WORKING_DIVISOR

    def validated(self) -> Params2D:
        """Return self with whole-number fields as ints (500.0 -> 500), or raise
        PanoptemError naming the parameter to change."""
        downsampling = as_whole(self.downsampling)
        if downsampling not in DOWNSAMPLING_FACTORS:
            raise PanoptemError(
                f"Image Downsampling must be one of {DOWNSAMPLING_FACTORS}; got {self.downsampling!r}."
            )
        for name in ("confidence_thr", "center_confidence_thr"):
            v = getattr(self, name)
            try:
                ok = not isinstance(v, (bool, np.bool_, str)) and 0.0 <= v <= 1.0
            except TypeError:
                ok = False
            if not ok:
                raise PanoptemError(f"{name} must lie between 0 and 1; got {v!r}.")
        min_distance = whole_count("Centers Min Distance", self.min_distance, lo=1)
        max_objects = divisor_count("Max objects per class", self.max_objects)
        tile_size = as_whole(self.tile_size)
        if tile_size is None or tile_size < 0:
            raise PanoptemError(
                f"Tile size must be 0 (no tiling) or a positive whole number; got {self.tile_size!r}.")
        return replace(self, downsampling=downsampling, max_objects=max_objects,
                       min_distance=min_distance, tile_size=tile_size)

    def to_dict(self) -> dict:
        return asdict(self)


def _pinned(x: torch.Tensor, cuda: bool) -> torch.Tensor:
    """``x`` in pinned memory where it goes from the CPU to a CUDA GPU: its copy is then
    queued on the stream like a kernel, where one from pageable memory may wait for the
    work queued before it."""
    return x.pin_memory() if cuda and x.device.type == "cpu" else x


class Engine2D:
    """Runs a model on 2D images with the original's 2D parameters.

    Parameters
    ----------
    model : str or dict or LoadedModel
        A registered model name (see :func:`panoptem.registry.list_models`), a config dict
        in the empanada format, or a model already loaded with
        :func:`panoptem.loading.load_model`.
    device : str or torch.device
        "cpu", "cuda", "cuda:1", ...
    quantized : bool
        Use the config's int8 model on CPU when it has one.
    progress : Progress, optional
        Receives the model download's progress.
    precision : str
        "float32" (default) or "bfloat16", an opt-in that runs the model under autocast
        (see :func:`panoptem.loading.load_model`); not with ``quantized``.
    """

    def __init__(self, model="MitoNet_v1", device="cpu", quantized: bool = False,
                 progress: Progress | None = None, precision: str = "float32") -> None:
        from panoptem.loading import LoadedModel, load_model

        if isinstance(model, LoadedModel):
            self.loaded = model
        else:
            self.loaded = load_model(model, device=device, quantized=quantized,
                                     progress=progress, precision=precision)
        #: The registered name of the model ("" when given as a config or a loaded model).
        self.model_name = model if isinstance(model, str) else ""
        cfg = self.loaded.config
        self.config = cfg
        self.device = self.loaded.device
        self.thing_list = [int(c) for c in cfg.get("thing_list", [])]
        self.padding_factor = int(cfg.get("padding_factor", 16))
        self.norms = cfg["norms"]
        self.timings: dict[str, float] = {}

    # ------------------------------------------------------------------ model call
    def heads(self, x255: torch.Tensor, downsampling: int = 1, fine_boundaries: bool = False):
        """Model outputs for one image.

        Parameters
        ----------
        x255 : Tensor (H, W) float32 with values in 0..255 (see :mod:`.preprocess`).

        Returns
        -------
        (sem_logits (C, Hp*s, Wp*s), ctr_hmp (h, w), offsets (2, h, w)) on the engine's
        device, where (Hp, Wp) is the downsampled image padded to the padding factor.
        """
        return self.heads_batch([x255], downsampling, fine_boundaries)[0]

    def heads_batch(self, images: list[torch.Tensor], downsampling: int = 1,
                    fine_boundaries: bool = False, wait: bool = True) -> list[tuple]:
        """Model outputs for several images of one shape, in one forward pass.

        Each image's outputs are those of :meth:`heads`: the model treats the images of a
        batch independently (eval mode), so only the order of floating-point sums inside
        its kernels can differ.

        On a GPU this waits for the forward pass (its time goes to ``timings["forward"]``)
        unless ``wait`` is False: the outputs are then still being computed on this
        thread's CUDA stream, and only work queued on that stream may use them.
        """
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) != 1:
            raise ValueError(f"the images of one forward pass must share a shape, not {sorted(shapes)}")
        cuda = self.device.type == "cuda"
        # non-blocking only where the source is pinned: on other devices (MPS) a copy from
        # pageable memory may still read it once the list of images is gone
        xs = [pre.downsample(_pinned(x, cuda).to(self.device, non_blocking=cuda)[None, None], downsampling)
              for x in images]
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        x = pre.pad_to_factor(pre.normalize(x, self.norms), self.padding_factor)
        render_steps = 2 + int(math.log2(downsampling))
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.loaded.module(x, render_steps, bool(fine_boundaries))
            if cuda and wait:  # this thread's stream, not the whole device
                torch.cuda.current_stream(self.device).synchronize()
        if wait:
            self.timings["forward"] = self.timings.get("forward", 0.0) + time.perf_counter() - t0
        try:
            sem, ctr, off = out["sem_logits"], out["ctr_hmp"], out["offsets"]
            return [(sem[i], ctr[i, 0], off[i]) for i in range(len(xs))]
        except (KeyError, IndexError, TypeError) as err:
            raise PanoptemError(
                "The model did not return 'sem_logits', 'ctr_hmp' and 'offsets'; it does not "
                f"follow the empanada model interface ({err})."
            ) from None

    def outputs(self, x255: torch.Tensor, p: Params2D):
        """Semantic probabilities, centre heat map and offsets of one image (see :meth:`heads`)."""
        sem, ctr, off = self.heads(x255, p.downsampling, p.fine_boundaries)
        return semantic_probabilities(sem), ctr, off

    def outputs_batch(self, images: list[torch.Tensor], p: Params2D, wait: bool = True) -> list[tuple]:
        """:meth:`outputs` of several images of one shape, in one forward pass (``wait``:
        see :meth:`heads_batch`)."""
        return [(semantic_probabilities(sem), ctr, off)
                for sem, ctr, off in self.heads_batch(images, p.downsampling, p.fine_boundaries, wait)]

    def panoptic(self, probs: torch.Tensor, ctr: torch.Tensor, off: torch.Tensor, p: Params2D,
                 shape: tuple[int, int]) -> np.ndarray:
        """Panoptic image of ``shape`` from :meth:`outputs`, objects made connected."""
        codes, ids = self.panoptic_codes(probs, ctr, off, p, shape)
        return np.take(ids.astype(np.int32), codes)

    def panoptic_codes(self, probs: torch.Tensor, ctr: torch.Tensor, off: torch.Tensor,
                       p: Params2D, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`panoptic` as an index image and the id of each index (see
        :func:`~.postprocess.connected_panoptic_codes`)."""
        return connected_panoptic_codes(
            probs, ctr, off, thing_list=self.thing_list, label_divisor=p.label_divisor,
            downsampling=p.downsampling, confidence_thr=p.confidence_thr,
            center_threshold=p.center_confidence_thr, min_distance=p.min_distance,
            semantic_only=p.semantic_only, crop=shape,
        )

    def _panoptic(self, x255: torch.Tensor, p: Params2D) -> np.ndarray:
        """Untiled panoptic result of one image or tile, objects made connected."""
        return self.panoptic(*self.outputs(x255, p), p, tuple(x255.shape))

    # ------------------------------------------------------------------ public calls
    def segment(self, image, params: Params2D | None = None, *, roi=None, value_range=None,
                progress: Progress | None = None, **overrides) -> np.ndarray:
        """Segment one 2D image.

        Parameters
        ----------
        image : array-like (H, W)
            Grayscale, any integer or float dtype (uint8 used as is, others mapped from
            their own intensity range, or from ``value_range``, onto 0..255).
        params : Params2D, optional
            Defaults to the widget defaults; keyword ``overrides`` replace single fields,
            e.g. ``engine.segment(img, downsampling=2, tile_size=1280)``.
        roi : array-like (H, W) bool, optional
            Only pixels inside the mask are segmented: the image is cropped to the mask's
            bounding box, pixels outside the mask are set to intensity 0 (as the original's
            "Confine to ROI") and labels outside it are cleared.
        value_range : (low, high), optional
            Intensity range mapped onto 0..255 for non-uint8 images (batch and 3D pass the
            range of the whole stack so every slice is scaled alike).
        progress : Progress, optional
            Receives one step per tile; cancel() stops between tiles.

        Returns
        -------
        ndarray (H, W) int32 panoptic ids ``class * max_objects + k`` (1..N when
        ``max_objects`` is 0).
        """
        p = replace(params or Params2D(), **overrides).validated()
        img = pre.check_image_2d(image)
        if roi is not None:
            return self._segment_roi(img, np.asarray(roi), p, value_range, progress)
        self.timings = {}
        t0 = time.perf_counter()
        vr = pre.intensity_range(img) if value_range is None else value_range
        x255 = pre.to_unit_range(img, vr)
        tiles = tile_grid(img.shape, p.tile_size) if p.tile_size > 0 else []
        if len(tiles) <= 1:
            out = self._panoptic(x255, p)
        else:
            things = [] if p.semantic_only else self.thing_list
            out = segment_tiled(img.shape, p.tile_size, lambda t: self._panoptic(x255[t.slices], p),
                                things, p.label_divisor, progress)
        if p.fill_holes:
            out = fill_holes(out)
        if p.max_objects == 0:
            out = number_from_one(out)
        self.timings["total"] = time.perf_counter() - t0
        return out

    def _segment_roi(self, img, roi, p: Params2D, value_range, progress) -> np.ndarray:
        if roi.shape != img.shape:
            raise PanoptemError(
                f"The ROI mask has shape {roi.shape} but the image has shape {img.shape}; "
                "draw the ROI on a layer of the image's shape."
            )
        roi = roi.astype(bool)
        if not roi.any():
            raise PanoptemError("The ROI mask is empty; draw a region to segment.")
        ys, xs = np.nonzero(roi.any(1))[0], np.nonzero(roi.any(0))[0]
        box = (slice(ys[0], ys[-1] + 1), slice(xs[0], xs[-1] + 1))
        vr = value_range if value_range is not None else pre.intensity_range(img)
        # outside the ROI: intensity 0 (the darkest value of the whole image's scaling)
        crop = np.where(roi[box], img[box], 0 if vr is None else vr[0]).astype(img.dtype)
        seg = self.segment(crop, p, value_range=vr, progress=progress)
        out = np.zeros(img.shape, dtype=np.int32)
        out[box] = np.where(roi[box], seg, 0)
        return out

    def segment_batch(self, images, params: Params2D | None = None, *,
                      progress: Progress | None = None, **overrides) -> np.ndarray:
        """Segment every image of a stack (N, H, W) or a list of 2D images.

        Images of different sizes are zero-padded at the bottom/right to the largest one
        and stacked (as the original's batch mode). Non-uint8 stacks are scaled with the
        intensity range of the whole stack. Progress: one step per image.

        Returns
        -------
        ndarray (N, H, W) int32.
        """
        p = replace(params or Params2D(), **overrides).validated()
        if isinstance(images, np.ndarray) and images.ndim == 2:
            images = images[None]
        if isinstance(images, np.ndarray) and images.ndim != 3:
            raise PanoptemError(
                f"Batch mode takes a stack (N, H, W) of 2D images; got shape {images.shape}."
            )
        images = [pre.check_image_2d(im, what=f"image {i}") for i, im in enumerate(images)]
        if not images:
            raise PanoptemError("The batch is empty; give at least one image.")
        ranges = [pre.intensity_range(im) for im in images]
        vr = None
        if all(r is not None for r in ranges) and len({im.dtype for im in images}) == 1:
            vr = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        prog = ensure_progress(progress)
        prog.stage("images", len(images))
        results = []
        for im in images:
            results.append(self.segment(im, p, value_range=vr))
            prog.advance()
        H = max(r.shape[0] for r in results)
        W = max(r.shape[1] for r in results)
        out = np.zeros((len(results), H, W), dtype=np.int32)
        for i, r in enumerate(results):
            out[i, : r.shape[0], : r.shape[1]] = r
        return out
