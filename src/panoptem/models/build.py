"""Build a model from a config dict in the original training-YAML format.

The keys are those of empanada-napari's ``training/pdl_model.yaml`` and
``training/bifpn_model.yaml`` (the ``MODEL`` section of a training config)::

    arch: PanopticDeepLabPR        # one of MODEL_ARCHS
    encoder: resnet50              # one of ENCODERS
    num_classes: 1                 # 1 for one class, else number of classes + 1
    # Panoptic-DeepLab: stage4_stride, decoder_channels, low_level_stages,
    #   low_level_channels_project, atrous_rates, aspp_channels, aspp_dropout,
    #   ins_decoder, ins_ratio
    # BiFPN: fpn_dim, fpn_layers, ins_decoder, depthwise
    # PointRend (…PR archs): num_fc, train_num_points, oversample_ratio,
    #   importance_sample_ratio, subdivision_steps, subdivision_num_points

Keys that are absent take the original classes' defaults; keys that belong to another
architecture (or to the registry config) are ignored, as the original ignores them.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

from torch import nn

from panoptem.errors import PanoptemError
from panoptem.models.encoders.resnet import ENCODERS
from panoptem.models.panoptic_bifpn import PanopticBiFPN, PanopticBiFPNPR
from panoptem.models.panoptic_deeplab import PanopticDeepLab, PanopticDeepLabPR
from panoptem.models.point_rend import POINT_REND_KEYS

__all__ = ["MODEL_ARCHS", "build_model", "count_parameters"]

_ARCH_CLASSES: dict[str, type[nn.Module]] = {
    "PanopticDeepLab": PanopticDeepLab,
    "PanopticDeepLabPR": PanopticDeepLabPR,
    "PanopticBiFPN": PanopticBiFPN,
    "PanopticBiFPNPR": PanopticBiFPNPR,
}

#: Names accepted as ``arch``.
MODEL_ARCHS: tuple[str, ...] = tuple(_ARCH_CLASSES)



def _accepted_keys(cls: type[nn.Module]) -> set[str]:
    keys: set[str] = set()
    for klass in cls.__mro__:
        if klass is nn.Module or "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        keys |= {
            k
            for k, p in params.items()
            if k != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
        }
    if cls.__name__.endswith("PR"):  # PointRend models take these through **kwargs
        keys |= set(POINT_REND_KEYS)
    return keys


def _fail(msg: str) -> None:
    raise PanoptemError(msg)


def _check_int_list(cfg: Mapping, key: str, minimum: int = 1) -> None:
    if key not in cfg:
        return
    value = cfg[key]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, int) and v >= minimum for v in value)
    ):
        _fail(
            f"Model config key '{key}' must be a non-empty list of integers >= {minimum}, "
            f"not {value!r}."
        )


def _validate(arch: str, kwargs: dict) -> None:
    num_classes = kwargs.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        _fail(
            f"Model config key 'num_classes' must be a positive integer (1 for a single "
            f"class, otherwise the number of classes + 1), not {num_classes!r}."
        )
    encoder = kwargs.get("encoder")
    if encoder not in ENCODERS:
        _fail(
            f"Unknown encoder {encoder!r} in the model config; set 'encoder' to one of "
            f"{', '.join(ENCODERS)} (RegNet encoders are not supported)."
        )
    if arch.startswith("PanopticDeepLab"):
        if kwargs.get("stage4_stride", 16) not in (16, 32):
            _fail(
                f"Model config key 'stage4_stride' must be 16 or 32, not "
                f"{kwargs['stage4_stride']!r}."
            )
        _check_int_list(kwargs, "low_level_stages")
        _check_int_list(kwargs, "low_level_channels_project")
        _check_int_list(kwargs, "atrous_rates")
        stages = kwargs.get("low_level_stages", [3, 2, 1])
        project = kwargs.get("low_level_channels_project", [128, 64, 32])
        if len(stages) != len(project):
            _fail(
                "Model config keys 'low_level_stages' and 'low_level_channels_project' "
                f"must have the same length ({len(stages)} vs {len(project)})."
            )
        if max(stages) > 4:
            _fail(f"Model config key 'low_level_stages' may only hold 1..4, not {stages}.")
        if len(kwargs.get("atrous_rates", [2, 4, 6])) != 3:
            _fail("Model config key 'atrous_rates' must list exactly 3 dilation rates.")
    else:
        for key in ("fpn_dim", "fpn_layers"):
            value = kwargs.get(key, 1)
            if not isinstance(value, int) or value < 1:
                _fail(f"Model config key '{key}' must be a positive integer, not {value!r}.")
    if arch.endswith("PR"):
        ratio = kwargs.get("importance_sample_ratio", 0.75)
        if not 0.0 <= float(ratio) <= 1.0:
            _fail(f"Model config key 'importance_sample_ratio' must be in [0, 1], not {ratio}.")
        if int(kwargs.get("oversample_ratio", 3)) < 1:
            _fail("Model config key 'oversample_ratio' must be >= 1.")
        for key in ("num_fc", "train_num_points", "subdivision_num_points"):
            value = kwargs.get(key, 1)
            if not isinstance(value, int) or value < 1:
                _fail(f"Model config key '{key}' must be a positive integer, not {value!r}.")


def build_model(config: Mapping) -> nn.Module:
    """Build a randomly initialised model from a training-YAML style config.

    Parameters
    ----------
    config : Mapping
        At least ``arch``, ``encoder`` and ``num_classes``; other keys as in the original's
        ``pdl_model.yaml`` / ``bifpn_model.yaml`` (null values mean "use the default").

    Returns
    -------
    torch.nn.Module
        One of :class:`PanopticDeepLab`, :class:`PanopticDeepLabPR`, :class:`PanopticBiFPN`,
        :class:`PanopticBiFPNPR`, in train mode. Its state dict has the same names and
        shapes as the original empanada model built from the same config, so original
        checkpoints (``checkpoint["state_dict"]``) load with ``load_state_dict``.

    Raises
    ------
    PanoptemError
        For a missing ``arch``/``encoder``/``num_classes``, an unknown architecture or
        encoder, or an invalid value.
    """
    if not isinstance(config, Mapping):
        _fail(f"The model config must be a mapping (the MODEL section), not {type(config)}.")
    for key in ("arch", "encoder", "num_classes"):
        if key not in config:
            _fail(
                f"The model config has no '{key}' key; add it (see the keys of "
                "pdl_model.yaml / bifpn_model.yaml)."
            )
    arch = config["arch"]
    if arch not in _ARCH_CLASSES:
        _fail(
            f"Unknown model architecture {arch!r}; set 'arch' to one of {', '.join(MODEL_ARCHS)}."
        )
    cls = _ARCH_CLASSES[arch]
    accepted = _accepted_keys(cls)
    kwargs = {k: v for k, v in config.items() if k in accepted and v is not None}
    _validate(arch, kwargs)
    return cls(**kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (each shared tensor counted once).

    With ``trainable_only``, only those with ``requires_grad``.
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
