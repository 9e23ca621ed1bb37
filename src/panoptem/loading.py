"""Loading TorchScript models onto a device, with a cache per (file, device, quantized).

:func:`load_model` resolves a registered name, a config dict or a config ``.yaml`` through
:mod:`panoptem.registry`, fetches the file (local path or cached download), loads it with
``torch.jit.load`` on the requested device and keeps it for the next call. The int8 file
is used only on CPU when asked for and present; one that cannot run falls back to the
float model with a warning (SPEC §5.15).

A float model is prepared for inference once per load (:func:`prepare_for_inference`):
frozen (weights and attributes folded into the graph, conv-batchnorm folding), with the
first layer of PointRend's point head applied to the feature map before sampling where
that is less work, and on CPU its wide 1-D convolutions run by oneDNN
(:mod:`panoptem._point_head_graph`). On CPUs with AVX-512 the convolutions then become
oneDNN channels-last ones with packed weights (:mod:`panoptem._conv_graph`); where that
cannot be done or does not pay, and on GPUs, ``torch.jit.optimize_for_inference``
optimises the frozen model for the device. On this machine's CPU that runs a forward pass
1.3-4x faster, with outputs equal to within about 1e-5. A model that cannot be frozen, or
whose prepared copy does not give the same outputs on a test image,
is used as loaded (with a warning). ``optimize=False`` keeps the file's module as it is.
An int8 file is prepared too on CPUs with AVX-512 (:func:`prepare_quantized`): frozen, with
its float convolutions made channels-last oneDNN ones. It is loaded for the fbgemm quantized
engine, or oneDNN's on CPUs with AMX int8 (:func:`_select_quantized_engine`).

``precision="bfloat16"`` is an opt-in that changes the numbers: the frozen float model runs
under ``torch.autocast`` in bfloat16 (:class:`ReducedPrecision`) and returns float32 outputs.
On a CPU with native bfloat16 (AVX-512 BF16) it ran 3D volumes about 1.4x faster than the
float32 model prepared by ``optimize_for_inference``, and 1.05-1.2x faster than the
channels-last float32 model; the segmentations agree closely but not exactly with float32
(see docs/inference-3d.md). On CPUs with AVX-512 and native bfloat16 its convolutions are
channels-last oneDNN ones with bfloat16 weights (:func:`prepare_reduced_precision`).
"""

from __future__ import annotations

import copy
import functools
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from panoptem import _download, registry
from panoptem._conv_graph import channels_last_convolutions, channels_last_pays
from panoptem._memory import release_free_memory
from panoptem._point_head_graph import (
    onednn_point_convolutions,
    rewrite_point_heads,
    scatter_into_own_dtype,
)
from panoptem.errors import Cancelled, PanoptemError, describe
from panoptem.progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["LoadedModel", "CachedModel", "load_model", "clear_model_cache", "cached_models",
           "resolve_config", "resolve_device", "prepare_for_inference", "prepare_quantized",
           "ReducedPrecision", "PRECISIONS"]

# The quantized engine int8 files are loaded for (the engine in force at load decides which
# kernels their convolutions are packed for), best first. fbgemm first by default: the "x86"
# engine's oneDNN kernels kept a fast path only for the input shape of their first call, and
# after the one-unit smoke test every later call took the slow path, about 2.5x slower at
# 256 x 256 (MitoNet_v1, 2 cores, AMD EPYC); fbgemm kernels have no such memory.
_QUANT_ENGINE_PREFERENCE = ("fbgemm", "x86", "qnnpack", "onednn")
# On CPUs with AMX int8, oneDNN's own engine first: its AMX convolutions ran MitoNet_v1's
# int8 file 1.4-1.6x faster than fbgemm on one thread at 256 x 256, whatever shape came first
# (64 x 256 x 256 stacks 4.3-4.6 s against 7.5 s, 2 cores, Intel Xeon with AMX).
_QUANT_ENGINE_PREFERENCE_AMX = ("onednn", "fbgemm", "x86", "qnnpack")
_OUTPUT_KEYS = ("sem_logits", "ctr_hmp", "offsets")
#: What ``precision=`` accepts: the file's own float32, or bfloat16 under autocast.
PRECISIONS = ("float32", "bfloat16")


@dataclass
class LoadedModel:
    """A TorchScript model ready for inference, with the config it came from.

    Attributes
    ----------
    module : torch.jit.ScriptModule
        In eval mode; call as ``module(x, render_steps, interpolate_ins)`` with ``x`` a
        (1, 1, H, W) float32 tensor, H and W multiples of the padding factor.
    config : dict
        The model config (a copy; changing it does not affect the registry).
    device : torch.device
        Where the module's weights live.
    quantized : bool
        Whether the quantized file is the one actually in use.
    path : Path or None
        The local file the module was loaded from.
    optimized : bool
        Whether ``module`` is the frozen, device-optimised copy (see
        :func:`prepare_for_inference`) rather than the file's module as loaded.
    weight_bytes : int
        Bytes of the floating-point weights and buffers of the file's module (int8 files
        count only their float parts: their int8 weights are packed).
    precision : str
        ``"float32"``, or ``"bfloat16"`` when ``module`` is a :class:`ReducedPrecision`.
    """

    module: torch.jit.ScriptModule
    config: dict
    device: torch.device
    quantized: bool
    path: Path | None = None
    optimized: bool = False
    weight_bytes: int = 0
    precision: str = "float32"


# (resolved path, device, quantized, optimize, precision) -> ((size, mtime_ns), module,
# optimized, weight bytes). The file signature makes a file that was overwritten (e.g. by a new
# finetuning run) load afresh.
_model_cache: dict[tuple[str, str, bool, bool, str], tuple[tuple[int, int], Any, bool, int]] = {}
_failed_quantized: dict[tuple[str, tuple[int, int]], str] = {}
_cache_lock = threading.RLock()


def clear_model_cache() -> None:
    """Forget every loaded model (the next :func:`load_model` reads the file again)."""
    with _cache_lock:
        _model_cache.clear()
        _failed_quantized.clear()


@dataclass(frozen=True)
class CachedModel:
    """One entry of the model cache: which file is loaded, on which device, int8 or not,
    in which precision."""

    path: Path
    device: str
    quantized: bool
    precision: str = "float32"


def cached_models() -> list[CachedModel]:
    """What the model cache holds now, in loading order (see :func:`load_model`)."""
    with _cache_lock:
        return [CachedModel(Path(path), device, quantized, precision)
                for path, device, quantized, _, precision in _model_cache]


def resolve_config(name_or_config: str | dict) -> tuple[str, dict]:
    """``(name, config)`` of a registered name, a config ``.yaml`` path or a config dict
    (checked; the name is "" for a dict). Raises PanoptemError listing the known models
    for an unknown name."""
    if isinstance(name_or_config, dict):
        return "", registry.validate_config(copy.deepcopy(name_or_config), "(given dict)")
    if isinstance(name_or_config, str | os.PathLike):
        text = os.fspath(name_or_config)
        if text in registry.list_models():
            return text, registry.get_config(text)
        if text.lower().endswith(".yaml") and Path(text).expanduser().is_file():
            return text, registry.read_config(text)
        return text, registry.get_config(text)  # raises: unknown model, listing the known ones
    raise PanoptemError(
        f"Expected a model name or a config dict, got {type(name_or_config).__name__}."
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """The torch device for ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (or a torch.device), or a
    PanoptemError saying what to use when it is not available here."""
    import torch

    try:
        dev = device if isinstance(device, torch.device) else torch.device(str(device).strip())
    except (RuntimeError, TypeError, ValueError):
        raise PanoptemError(
            f"Unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N' (N = GPU index)."
        ) from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no usable GPU"
            raise PanoptemError(
                f"Device '{dev}' was requested but CUDA is not available ({build}). "
                "Use device='cpu', or install a CUDA build of torch on a machine with an "
                "NVIDIA GPU."
            )
        count = torch.cuda.device_count()
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= count:
            raise PanoptemError(
                f"Device '{dev}' was requested but only {count} GPU(s) exist "
                f"(cuda:0 .. cuda:{count - 1}): choose an existing index."
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise PanoptemError("Device 'mps' was requested but is not available: use 'cpu'.")
        return dev
    raise PanoptemError(f"Device '{dev}' is not supported: use 'cpu', 'cuda' or 'cuda:N'.")


def _file_signature(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def _jit_load(path: Path, device: torch.device, source: str) -> Any:
    import torch

    try:
        with warnings.catch_warnings():
            # TorchScript is the model format of empanada; its deprecation notice is noise here.
            warnings.filterwarnings(
                "ignore", r"`torch\.jit\.load` is deprecated", DeprecationWarning
            )
            module = torch.jit.load(str(path), map_location=device)
    except Cancelled:
        raise
    except Exception as exc:
        reason = describe(exc)
        if "Unknown builtin op" in str(exc):
            advice = (
                f"The file calls an operation that this PyTorch ({torch.__version__}) does not "
                "have, so it was most likely saved by a newer PyTorch: upgrade PyTorch "
                "(pip install -U torch), or export the model again with this version."
            )
        elif _download.is_url(source):
            advice = (
                f"It is the downloaded copy of {source}: delete {path} and load the model "
                "again to download a fresh copy."
            )
        else:
            advice = (
                "If it is a training checkpoint or a state dict, export it to TorchScript "
                "first (torch.jit.script + torch.jit.save, or panoptem's export); if it was "
                "copied or downloaded, copy or download it again."
            )
        raise PanoptemError(
            f"{path} is not a loadable TorchScript model ({reason}). {advice}"
        ) from None
    module.eval()
    return module


def _has_amx_int8() -> bool:
    """Whether torch finds AMX int8 instructions on this CPU (False where this torch cannot
    tell)."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities is not None and capabilities().get("amx_int8", False))


def _select_quantized_engine() -> None:
    """Select the quantized CPU backend int8 files are loaded with (at load, not import).

    The first of ``_QUANT_ENGINE_PREFERENCE`` (``_QUANT_ENGINE_PREFERENCE_AMX`` on a CPU
    with AMX int8) that this torch build supports is selected, whatever was selected
    before, because the engine in force at load decides which kernels the file's
    convolutions are packed for.
    """
    import torch

    supported = [e for e in torch.backends.quantized.supported_engines if e != "none"]
    preference = _QUANT_ENGINE_PREFERENCE_AMX if _has_amx_int8() else _QUANT_ENGINE_PREFERENCE
    for engine in (*preference, *supported):
        if engine in supported:
            torch.backends.quantized.engine = engine
            return
    raise PanoptemError("this torch build has no quantized CPU backend")


def _smoke_test(module: Any, padding_factor: int) -> None:
    """Run a zero image of one padding unit through the model; raise if anything is wrong."""
    import torch

    x = torch.zeros(1, 1, padding_factor, padding_factor)
    with torch.no_grad():
        out = module(x, 2, True)
    if not isinstance(out, dict) or any(k not in out for k in _OUTPUT_KEYS):
        raise RuntimeError(f"the model does not return the outputs {', '.join(_OUTPUT_KEYS)}")


def _check_image(device: torch.device, padding_factor: int) -> torch.Tensor:
    """The random test image a prepared model is checked on: about 64 x 64, in whole
    padding units, the same every time."""
    import torch

    # small: the check sets the peak memory of a whole run. At 512 x 512 (the four padding
    # units used before, for MitoNet_v1_mini) a mini 3D run peaked at 1040 MB, at 256 x 256
    # MitoNet_v1's at 910 MB. At 64 x 64 (128 x 128 for mini) and one step, PointRend
    # refines all 1024 (4096) cells of its grid: with more cells than its 8192 points, ties
    # in the uncertainty can pick other points
    unit = int(padding_factor)
    size = unit * max(1, -(-64 // unit))
    return torch.rand(1, 1, size, size, generator=torch.Generator().manual_seed(0)).to(device)


def _freeze(module: Any, rewrite: bool, onednn: bool = False, rows: bool = False) -> Any:
    """``torch.jit.freeze`` of ``module``; with ``rewrite``, its PointRend point heads
    replaced by :func:`~panoptem._point_head_graph.rewrite_point_heads` (on points as rows
    with ``rows``), and with ``onednn`` (float32 on CPU) their remaining 1-D convolutions
    made oneDNN ones (:func:`~panoptem._point_head_graph.onednn_point_convolutions`)."""
    import torch

    frozen = torch.jit.freeze(module.eval())
    if rewrite:
        rewrite_point_heads(frozen, rows=rows)
    if onednn:
        onednn_point_convolutions(frozen)
    return frozen


def _channels_last(module: Any, rewrite: bool) -> Any:
    """Frozen as by :func:`_freeze` (CPU), its point heads on points as rows, its
    convolutions made channels-last oneDNN ones."""
    frozen = _freeze(module, rewrite, onednn=rewrite, rows=rewrite)
    if not channels_last_convolutions(frozen):
        raise RuntimeError("it has no convolutions that oneDNN's channels-last kernels can take")
    return frozen


def _optimized(module: Any, rewrite: bool, cpu: bool) -> Any:
    """Frozen as by :func:`_freeze`, then ``torch.jit.optimize_for_inference``."""
    import torch

    return torch.jit.optimize_for_inference(_freeze(module, rewrite, onednn=rewrite and cpu))


def _prepared_candidates(module: Any, device: torch.device) -> list:
    """How to make the prepared copies of ``module`` to try, best first: with the point-head
    rewrite, then without (the file's graph, frozen and optimised, nothing else); on CPUs
    with AVX-512 each first with channels-last convolutions, then through
    ``optimize_for_inference``."""
    cpu = device.type == "cpu"
    candidates = []
    for rewrite in (True, False):
        if cpu and channels_last_pays():
            candidates.append(functools.partial(_channels_last, module, rewrite))
        candidates.append(functools.partial(_optimized, module, rewrite, cpu))
    return candidates


def _check_prepared(module: Any, prepared: Any, device: torch.device, padding_factor: int,
                    agree: Any) -> None:
    """Run ``module`` and its prepared copy on the check image (:func:`_check_image`, one
    PointRend step, no fine boundaries); raise RuntimeError naming the first output for
    which ``agree(want, got)`` is false."""
    import torch

    x = _check_image(device, padding_factor)
    with torch.inference_mode():
        want, got = module(x, 1, False), prepared(x, 1, False)
    for key in _OUTPUT_KEYS:
        if not agree(want[key], got[key]):
            raise RuntimeError(f"its '{key}' output differs from the model's")


def _within_int8_flips(want: Any, got: Any) -> bool:
    """At most 1 % of the output's range anywhere and 0.01 % on average: float values that
    change in their last bit may cross an int8 rounding step downstream."""
    diff = (got - want).abs()
    scale = 1.0 + float(want.abs().max())
    return float(diff.max()) <= 1e-2 * scale and float(diff.mean()) <= 1e-4 * scale


def prepare_for_inference(module: Any, device: torch.device, padding_factor: int) -> tuple[Any, bool]:
    """A frozen, device-optimised copy of ``module``, or ``module`` itself if that fails.

    The copy's PointRend point heads are rewritten (:mod:`panoptem._point_head_graph`) and,
    on CPU, its convolutions made channels-last oneDNN ones (:mod:`panoptem._conv_graph`),
    with the point heads then on points as rows (:mod:`panoptem._point_rows`);
    a copy that cannot be made, or that then fails the check, is made again the next way
    (:func:`_prepared_candidates`). Each copy is checked against the module on a small
    random test image (about 64 x 64, in whole padding units) with one PointRend step and
    without fine boundaries, so that every cell is refined and no point selection can flip
    on ties; outputs that differ by more than 1e-3 count as a failure. Returns
    ``(module, optimized)``.
    """
    import torch

    for make in _prepared_candidates(module, device):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared = make()
                _check_prepared(module, prepared, device, padding_factor,
                                lambda want, got: torch.allclose(want, got, rtol=1e-3, atol=1e-3))
        except Cancelled:
            raise
        except Exception as exc:
            failure = exc
            continue
        return prepared, True
    warnings.warn(
        f"The model cannot be prepared for faster inference ({describe(failure)}); "
        "it runs as loaded.",
        UserWarning,
        stacklevel=3,
    )
    return module, False


def prepare_quantized(module: Any, padding_factor: int) -> tuple[Any, bool]:
    """A frozen copy of an int8 ``module`` whose float convolutions (the heads' last ones,
    MitoNet_v1's ASPP pooling and projections; all but the encoder's in the original's
    mini file) are channels-last oneDNN ones (:func:`channels_last_convolutions`), on CPUs
    where those pay (:func:`channels_last_pays`); else, or if that fails or the copy
    disagrees with ``module`` on the check image, ``module`` itself. Returns
    ``(module, optimized)``.

    Frozen alone, panoptem's int8 exports ran slower (MitoNet_v1_mini at 256 x 256 on one
    thread: 47.5 -> 49.0 ms); with channels-last float convolutions faster (46.7 ms;
    MitoNet_v1 76.9 -> 69.2 ms). The int8 kernels are untouched, but a float value that
    changes in its last bit can land on the other side of an int8 rounding step downstream,
    so the check allows more than the float one: on the check image MitoNet_v1_mini's
    logits moved by up to 0.006 (of 18) at a few pixels, 2e-6 on average.
    """
    import torch

    if not channels_last_pays():
        return module, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = torch.jit.freeze(module.eval())
            if not channels_last_convolutions(frozen):
                return module, False
            _check_prepared(module, frozen, torch.device("cpu"), padding_factor, _within_int8_flips)
    except Cancelled:
        raise
    except Exception:  # the int8 file runs as loaded, as it did before
        return module, False
    return frozen, True


class ReducedPrecision:
    """A float model run under ``torch.autocast`` in a lower precision (bfloat16).

    Called like the TorchScript module it wraps (``m(x, render_steps, interpolate_ins)``);
    the outputs come back as float32. Convolutions and matrix products run in bfloat16,
    the operations autocast keeps in float32 do not.
    """

    def __init__(self, module: Any, device_type: str, dtype: Any) -> None:
        self.module = module
        self.device_type = device_type
        self.dtype = dtype

    def __call__(self, x, render_steps: int, interpolate_ins: bool) -> dict:
        import torch

        with torch.autocast(self.device_type, dtype=self.dtype):
            out = self.module(x, render_steps, interpolate_ins)
        return {k: v.float() for k, v in out.items()}


def _native_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX)."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def check_precision(precision: str, device: torch.device, quantized: bool) -> None:
    """Refuse a precision this device cannot run or that conflicts with ``quantized``;
    warn where bfloat16 runs without hardware support (then slower than float32)."""
    import torch

    if precision not in PRECISIONS:
        raise PanoptemError(f"Unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    if precision == "float32":
        return
    if quantized:
        raise PanoptemError(
            "Choose either the quantized (int8) model or bfloat16 precision, not both: "
            "untick 'Use quantized model' (CLI: drop --quantized) or use float32."
        )
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PanoptemError(f"{device} has no bfloat16 support; use float32 precision.")
    if device.type == "cpu" and not _native_bfloat16():
        warnings.warn(
            "This CPU has no native bfloat16 (AVX-512 BF16 or AMX): bfloat16 inference runs "
            "emulated and is likely slower than float32.",
            UserWarning,
            stacklevel=3,
        )


def _channels_last_reduced(module: Any, device: torch.device, padding_factor: int,
                           dtype: Any) -> ReducedPrecision | None:
    """``module`` frozen with its point heads rewritten, its convolutions channels-last
    oneDNN ones in ``dtype`` (:func:`channels_last_convolutions`) but for the point heads'
    large 1-D ones, which stay float32 oneDNN ones
    (:func:`~panoptem._point_head_graph.onednn_point_convolutions`), run under autocast;
    None where that cannot be made or its outputs on the check image are not finite."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frozen = _freeze(module, True)
        onednn_point_convolutions(frozen, float_inputs=True)
        if not channels_last_convolutions(frozen, dtype):
            return None
        scatter_into_own_dtype(frozen)
        wrapped = ReducedPrecision(frozen, device.type, dtype)
        with torch.inference_mode():
            out = wrapped(_check_image(device, padding_factor), 1, False)
    except Exception:
        return None
    return wrapped if _first_not_finite(out) is None else None


def _first_not_finite(out: dict) -> str | None:
    """The first of the model's outputs missing from ``out`` or not finite, else None."""
    import torch

    return next((key for key in _OUTPUT_KEYS
                 if key not in out or not bool(torch.isfinite(out[key]).all())), None)


def prepare_reduced_precision(module: Any, device: torch.device, padding_factor: int,
                              dtype: Any, freeze: bool = True) -> ReducedPrecision:
    """``module`` run under autocast in ``dtype``: frozen with ``freeze``, its point heads
    rewritten as in :func:`prepare_for_inference` (as loaded if it cannot be frozen).
    On CPUs with AVX-512 and native bfloat16 its convolutions are first made channels-last
    oneDNN ones with their weights stored in ``dtype``, its point heads' wide layers
    float32 oneDNN ones (:func:`_channels_last_reduced`): otherwise oneDNN re-orders the
    weights and activations on every call, and torch's bfloat16 1-D convolutions copy their
    outputs between layouts (MitoNet_v1 at 256 x 256 on one thread, Intel Xeon with AMX:
    476-569 ms before, 223-231 ms after; float32 324-496 ms).
    Raises PanoptemError if its outputs on the check image are not finite.
    ``optimize_for_inference`` is not applied: under bfloat16 autocast its oneDNN graph
    crashes the process (torch 2.13, CPU)."""
    import torch

    if freeze and device.type == "cpu" and channels_last_pays() and _native_bfloat16():
        prepared = _channels_last_reduced(module, device, padding_factor, dtype)
        if prepared is not None:
            return prepared
    frozen = module
    # with its point heads rewritten; if that fails, without; if freezing fails, as loaded
    for rewrite in (True, False) if freeze else ():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frozen = _freeze(module, rewrite)
            break
        except Exception:
            continue
    scatter_into_own_dtype(frozen)  # the point heads' refined points, bfloat16 on GPUs
    wrapped = ReducedPrecision(frozen, device.type, dtype)
    with torch.inference_mode():
        out = wrapped(_check_image(device, padding_factor), 1, False)
    key = _first_not_finite(out)
    if key is not None:
        raise PanoptemError(
            f"The model's '{key}' output is not finite in bfloat16; use float32 precision."
        )
    return wrapped


def float_weight_bytes(module: Any) -> int:
    """Bytes of the floating-point tensors in ``module``'s state dict (packed int8 weights
    are not tensors there and count 0). 0 for a module without a readable state dict: the
    count only steers how many 3D slices go through the model per call."""
    import torch

    try:
        tensors = list(module.state_dict().values())
    except (AttributeError, RuntimeError):
        return 0
    return sum(t.numel() * t.element_size() for t in tensors
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def _load_cached(
    source: str,
    known_hash: str | None,
    device: torch.device,
    quantized: bool,
    padding_factor: int,
    progress: Progress | None,
    optimize: bool = False,
    precision: str = "float32",
) -> tuple[Any, Path, bool, int]:
    try:
        path = registry.fetch_file(source, known_hash=known_hash, progress=progress)
    except PanoptemError as err:
        if not _download.is_url(source):
            raise
        raise PanoptemError(
            f"{err} Until it can be downloaded, use '{registry.OFFLINE_MODEL}': it ships with "
            "panoptem and needs no download."
        ) from None
    resolved = path.resolve()
    key = (str(resolved), str(device), quantized, optimize, precision)
    signature = _file_signature(resolved)
    with _cache_lock:
        hit = _model_cache.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1], path, hit[2], hit[3]
        if quantized and (str(resolved), signature) in _failed_quantized:
            raise RuntimeError(_failed_quantized[(str(resolved), signature)])
        try:
            module = _jit_load(path, device, source)
            if quantized:
                _smoke_test(module, padding_factor)
        except Cancelled:
            raise
        except Exception as exc:
            if quantized:
                _failed_quantized[(str(resolved), signature)] = describe(exc)
            raise
        nbytes = float_weight_bytes(module)  # a frozen copy keeps its weights out of its state dict
        optimized = False
        if precision != "float32":
            import torch

            module = prepare_reduced_precision(module, device, padding_factor,
                                               getattr(torch, precision), freeze=optimize)
        elif optimize and quantized:
            module, optimized = prepare_quantized(module, padding_factor)
        elif optimize:
            module, optimized = prepare_for_inference(module, device, padding_factor)
        if optimize or precision != "float32":
            release_free_memory()  # the copies that freezing and optimising went through
        _model_cache[key] = (signature, module, optimized, nbytes)
        return module, path, optimized, nbytes


def load_model(
    name_or_config: str | dict,
    device: str | torch.device = "cpu",
    quantized: bool = False,
    progress: Progress | None = None,
    optimize: bool = True,
    precision: str = "float32",
) -> LoadedModel:
    """Load a model's TorchScript file onto a device, downloading it first if needed.

    Loaded modules are cached per (file, device, quantized): calling again returns the same
    module object without reading the file (until :func:`clear_model_cache` or the file
    changes on disk).

    Parameters
    ----------
    name_or_config : str or dict
        A registered model name, the path of a config ``.yaml``, or a config dict.
    device : str or torch.device
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    quantized : bool
        Use the config's ``model_quantized`` file. Honoured only on CPU and when the config
        has one (as in the original); otherwise the float model is used. A quantized file
        that cannot be fetched, loaded or run on a zero test image falls back to the float
        model with a warning.
    progress : Progress, optional
        Receives download progress.
    optimize : bool
        Prepare the model for inference (a float one frozen and optimised for the device,
        see :func:`prepare_for_inference`, in bfloat16 frozen only; an int8 one see
        :func:`prepare_quantized`); False uses the file's module as it is.
    precision : str
        ``"float32"`` (default, the file's own numbers) or ``"bfloat16"``: the float model,
        frozen, runs under autocast in bfloat16 (:class:`ReducedPrecision`). Opt-in: faster
        for 3D stacks on CPUs with AVX-512 BF16 or AMX, with segmentations that agree
        closely but not exactly. Cannot be combined with ``quantized``.

    Returns
    -------
    LoadedModel
        ``quantized`` tells which file is actually in use.

    Raises
    ------
    PanoptemError
        Unknown model or broken config, unavailable device, file missing or not
        downloadable, file not TorchScript; an unknown precision, bfloat16 together with
        ``quantized`` or on a GPU without bfloat16, or a model that does not run in it.

    Warns
    -----
    UserWarning
        When a requested quantized model is unusable and the float model is used instead.
    """
    name, config = resolve_config(name_or_config)
    dev = resolve_device(device)
    pf = int(config["padding_factor"])
    check_precision(precision, dev, quantized)

    if quantized and dev.type == "cpu" and config.get("model_quantized"):
        source = config["model_quantized"]
        try:
            _select_quantized_engine()
            module, path, optimized, nbytes = _load_cached(
                source, config.get("model_quantized_hash"), dev, True, pf, progress, optimize
            )
            return LoadedModel(module, config, dev, True, path, optimized, weight_bytes=nbytes)
        except Cancelled:
            raise
        except Exception as exc:
            which = f"of '{name}' " if name else ""
            warnings.warn(
                f"The quantized model {which}({source}) cannot be used "
                f"({describe(exc)}); using the float model instead.",
                UserWarning,
                stacklevel=2,
            )

    module, path, optimized, nbytes = _load_cached(
        config["model"], config.get("model_hash"), dev, False, pf, progress, optimize, precision
    )
    return LoadedModel(module, config, dev, False, path, optimized, nbytes, precision)
